//! The stop-sequence matcher against a brute-force reference: for any text, any set of
//! sequences and any way of cutting the text into pieces, the output is the text up to
//! the first match (the match ending first, the longest of those ending together).

use inferd_core::stop::{StopMatcher, TokenText};
use proptest::prelude::*;

/// The reference: scan every end position, cut before the longest sequence ending there.
fn reference(text: &str, seqs: &[String]) -> (String, bool) {
    let bytes = text.as_bytes();
    for end in 1..=bytes.len() {
        let longest =
            seqs.iter().filter(|s| bytes[..end].ends_with(s.as_bytes())).map(String::len).max();
        if let Some(len) = longest {
            return (text[..end - len].to_owned(), true);
        }
    }
    (text.to_owned(), false)
}

/// Text over a small alphabet (one multibyte letter) so sequences match often.
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof![Just('a'), Just('b'), Just('c'), Just('é')], 0..max)
        .prop_map(|v| v.into_iter().collect())
}

fn seqs() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(text(6).prop_filter("non-empty", |s| !s.is_empty()), 0..=4)
}

/// Cuts `text` into pieces at char boundaries chosen by `cuts` (fractions of its length).
fn pieces<'a>(text: &'a str, cuts: &[u16]) -> Vec<&'a str> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * text.len() / usize::from(u16::MAX))
        .map(|mut i| {
            while !text.is_char_boundary(i) {
                i += 1;
            }
            i
        })
        .collect();
    at.push(0);
    at.push(text.len());
    at.sort_unstable();
    at.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_chunking_gives_the_text_before_the_first_match(
        t in text(60), seqs in seqs(), cuts in proptest::collection::vec(any::<u16>(), 0..12)
    ) {
        let mut m = StopMatcher::new(&seqs).unwrap();
        let longest = seqs.iter().map(String::len).max().unwrap_or(0);
        let mut out = String::new();
        let mut fed = 0;
        let mut stopped = false;
        for p in pieces(&t, &cuts) {
            stopped = m.push(p, &mut out);
            fed += p.len();
            if stopped {
                break;
            }
            // What is held back is less than a whole sequence, and all that was fed
            // is either out or held.
            prop_assert!(m.held_bytes() < longest.max(1));
            prop_assert_eq!(out.len() + m.held_bytes(), fed);
        }
        m.finish(&mut out);
        prop_assert_eq!((out, stopped), reference(&t, &seqs));
    }

    #[test]
    fn token_bytes_cut_anywhere(
        t in text(40), seqs in seqs(), cuts in proptest::collection::vec(any::<u16>(), 0..12)
    ) {
        // Cuts here may fall inside a character: tokens are bytes.
        let bytes = t.as_bytes();
        let mut at: Vec<usize> = cuts.iter().map(|&c| usize::from(c) * bytes.len() / usize::from(u16::MAX)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        let mut tt = TokenText::new(StopMatcher::new(&seqs).unwrap());
        let mut out = String::new();
        let mut stopped = false;
        for w in at.windows(2) {
            stopped = tt.push(&bytes[w[0]..w[1]], &mut out);
        }
        tt.finish(&mut out);
        prop_assert_eq!((out, stopped), reference(&t, &seqs));
    }
}
