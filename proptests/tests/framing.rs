//! `LineDecoder` against the reference splitter: the same lines for any chunking of
//! any byte stream, never more than `cap + 1` bytes of an unfinished line held, and
//! work linear in the bytes pushed.

use inferd_proptests::check_line_decoder;
use inferd_proptests::model::{RefLine, split_lines};
use proptest::prelude::*;

/// Bytes with the interesting ones (LF, CR, blanks) over-represented.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        6 => Just(b'\n'),
        3 => Just(b'\r'),
        3 => Just(b' '),
        1 => Just(b'\t'),
        10 => b'a'..=b'e',
        2 => any::<u8>(),
    ];
    proptest::collection::vec(byte, 0..300)
}

fn cuts() -> impl Strategy<Value = Vec<(usize, bool)>> {
    proptest::collection::vec((1usize..40, any::<bool>()), 1..20)
}

/// Long lines of one filler byte (blank or not), rarely ended, in small pieces: the
/// shape that made every read rescan the line so far.
fn long_lines() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        1 => Just(b"\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        8 => (1usize..4000, prop_oneof![Just(b' '), Just(b'\t'), Just(b'x')])
            .prop_map(|(n, b)| vec![b; n]),
    ];
    proptest::collection::vec(piece, 1..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// `check_line_decoder` asserts the work bound after every chunk; here the lines are
    /// long enough (and the chunks small enough) for rescanning to show.
    #[test]
    fn work_is_linear_in_the_bytes_pushed(
        s in long_lines(),
        cap in prop_oneof![1usize..64, 4000usize..50_000],
        cuts in proptest::collection::vec((1usize..64, Just(true)), 1..8),
    ) {
        check_line_decoder(&s, cap, &cuts);
    }

    #[test]
    fn same_lines_for_any_chunking(s in stream(), cap in 1usize..24, cuts in cuts()) {
        check_line_decoder(&s, cap, &cuts);
    }

    #[test]
    fn byte_at_a_time_and_all_at_once_agree(s in stream(), cap in 1usize..24) {
        check_line_decoder(&s, cap, &[(1, true)]);
        check_line_decoder(&s, cap, &[(usize::MAX / 2, true)]);
        check_line_decoder(&s, cap, &[(1, false)]);
    }

    #[test]
    fn long_lines_around_the_cap(
        pre in "[a-c ]{0,4}",
        len in 0usize..40,
        cap in 1usize..24,
        cr in any::<bool>(),
        blank in any::<bool>(),
        cuts in cuts(),
    ) {
        let mut s = pre.into_bytes();
        s.push(b'\n');
        s.extend(std::iter::repeat_n(if blank { b' ' } else { b'x' }, len));
        if cr {
            s.push(b'\r');
        }
        s.extend_from_slice(b"\nafter\n");
        check_line_decoder(&s, cap, &cuts);
    }
}

#[test]
fn reference_examples() {
    let s = split_lines(b"ok\r\n\n  \nabcdef\nlater\n", 5);
    assert_eq!(s.lines, vec![RefLine::Line(b"ok".to_vec()), RefLine::TooLarge]);
}

/// Regression: an unfinished line was scanned, then overflowed in a later chunk; the
/// decoder kept a stale scan offset and panicked on its next `next_line`.
#[test]
fn overflow_after_a_scanned_partial_line() {
    check_line_decoder(b"abcdefghij\nok\n", 5, &[(3, true), (7, true)]);
}

/// A whitespace-only line of exactly `cap + 1` bytes is over the cap like any other.
#[test]
fn blank_line_one_over_the_cap() {
    check_line_decoder(b"      \nx\n", 5, &[(100, true)]);
}
