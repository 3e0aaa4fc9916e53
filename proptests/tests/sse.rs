//! Property tests of the server-sent events decoder: chunking never changes what it
//! finds, and a stream written with any line ends and comments decodes to the events
//! it was written from.

use inferd_core::sse::SseEvent;
use inferd_proptests::sse::{decode_chunked, fuzz_sse};
use proptest::prelude::*;

fn event() -> impl Strategy<Value = SseEvent> {
    // Data lines and types never hold CR or LF: those end lines.
    let text = "[a-z{}\":, é\\[\\]]{0,12}";
    prop_oneof![
        1 => Just(SseEvent::Done),
        6 => (proptest::option::of("[a-z]{1,6}"), prop::collection::vec(text, 1..4)).prop_map(
            |(event, lines)| SseEvent::Message { event, data: lines.join("\n") }
        ),
    ]
}

/// Writes `events` with line end `eol`, a comment before each when `comments`.
fn write(events: &[SseEvent], eol: &str, comments: bool) -> Vec<u8> {
    let mut s = String::new();
    for e in events {
        if comments {
            s.push_str(": keep-alive");
            s.push_str(eol);
        }
        match e {
            SseEvent::Done => s.push_str(&format!("data: [DONE]{eol}")),
            SseEvent::Message { event, data } => {
                if let Some(ev) = event {
                    s.push_str(&format!("event:{ev}{eol}id: 1{eol}"));
                }
                for line in data.split('\n') {
                    s.push_str(&format!("data: {line}{eol}"));
                }
            }
        }
        s.push_str(eol);
    }
    s.into_bytes()
}

proptest! {
    #[test]
    fn any_chunking_gives_the_written_events(
        events in prop::collection::vec(event(), 0..8),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        comments in any::<bool>(),
        cuts in prop::collection::vec(0usize..400, 0..20),
    ) {
        let bytes = write(&events, eol, comments);
        let got = decode_chunked(&bytes, &cuts, 1 << 16);
        prop_assert_eq!(got.error, None);
        prop_assert!(!got.mid_event);
        prop_assert_eq!(got.events, events);
    }

    #[test]
    fn arbitrary_bytes_decode_the_same_whole_or_cut(
        bytes in prop::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), any::<u8>(),
                        Just(b'd'), Just(b'a'), Just(b't')], 0..200),
        cuts in prop::collection::vec(0usize..200, 0..20),
        max in prop_oneof![Just(1usize << 16), 1usize..40],
    ) {
        let whole = decode_chunked(&bytes, &[], max);
        prop_assert_eq!(decode_chunked(&bytes, &cuts, max), whole);
    }

    #[test]
    fn fuzz_check_holds(data in prop::collection::vec(any::<u8>(), 0..120)) {
        fuzz_sse(&data);
    }
}

/// A stream cut inside an event is seen as cut, at every cut point of the last event.
#[test]
fn every_truncation_of_an_event_is_mid_event() {
    let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n";
    let first_end = 15;
    for end in first_end + 1..stream.len() - 1 {
        let got = decode_chunked(&stream[..end], &[], 1 << 16);
        assert!(got.mid_event, "cut at {end}: {got:?}");
        assert_eq!(got.events.len(), 1, "cut at {end}");
    }
}
