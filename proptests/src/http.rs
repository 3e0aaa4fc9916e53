//! Checks of the HTTP request reader shared by its property tests and its fuzz target.

use inferd_core::http::request::{Event, Limits, RequestReader};

use crate::rng::Rng;

/// Feeds `stream` to a [`RequestReader`] with `limits` in chunks of the given lengths
/// (cycled), answering every request at once, and returns the events. Checks on the way
/// that the events come in order (a head, then its body of the announced length; an
/// error last), that the limits hold as bytes arrive, and that `has_partial` and
/// `wants_bytes` tell the truth. Panics on a violation.
pub fn check_request_reader(stream: &[u8], limits: Limits, chunks: &[usize]) -> Vec<Event> {
    let mut r = RequestReader::new(limits);
    let mut events = Vec::new();
    let mut pending_length = None;
    let mut failed = false;
    let mut pos = 0;
    let mut lens = chunks.iter().copied().cycle();
    while pos < stream.len() {
        let len = lens.next().unwrap_or(stream.len()).max(1);
        let end = pos.saturating_add(len).min(stream.len());
        assert!(r.wants_bytes() || failed, "the reader refused bytes while no request is out");
        r.push(&stream[pos..end]);
        pos = end;
        while let Some(ev) = r.poll() {
            assert!(!failed, "an event after an error: {ev:?}");
            match &ev {
                Event::Head(h) => {
                    assert!(pending_length.is_none(), "two heads without a body");
                    assert!(h.content_length <= limits.max_body_bytes, "body limit passed");
                    pending_length = Some(h.content_length);
                }
                Event::Body(b) => {
                    let want = pending_length.take();
                    assert_eq!(Some(b.len()), want, "body length differs from the head's");
                    r.next_request();
                }
                Event::Error(_) => {
                    failed = true;
                    assert_eq!(r.buffered(), 0, "a failed reader keeps its buffer");
                    assert!(!r.wants_bytes());
                }
            }
            events.push(ev);
        }
        if failed {
            assert!(!r.has_partial());
            continue;
        }
        match pending_length {
            // Waiting for a body: fewer bytes than it needs are held.
            Some(n) => {
                assert!(r.buffered() < n, "a whole body is buffered but not handed out");
                assert!(r.has_partial(), "a body is due but no partial request is reported");
            }
            // Waiting for a head: never more than the head limit.
            None => {
                assert!(
                    r.buffered() <= limits.max_head_bytes,
                    "{} bytes of an unfinished head held (limit {})",
                    r.buffered(),
                    limits.max_head_bytes
                );
                let blank =
                    stream[pos - r.buffered()..pos].iter().all(|b| matches!(b, b'\r' | b'\n'));
                assert_eq!(r.has_partial(), !blank, "has_partial with {} bytes held", r.buffered());
            }
        }
    }
    events
}

/// Fuzz entry: the HTTP request reader on arbitrary bytes. Byte 0 picks the limits,
/// byte 1 the chunking; the rest is the stream, which must give the same events fed
/// in chunks as fed whole.
#[doc(hidden)]
pub fn fuzz_http_request(data: &[u8]) {
    let [l, k, stream @ ..] = data else { return };
    let limits = Limits {
        max_head_bytes: 16 + usize::from(l & 0x3f) * 8,
        max_headers: usize::from(l >> 6) * 3,
        max_body_bytes: usize::from(l & 0x0f) * 4,
    };
    let mut rng = Rng::new(u64::from(*k));
    let chunks: Vec<usize> = (0..16).map(|_| rng.range_usize(1, 24)).collect();
    let whole = check_request_reader(stream, limits, &[stream.len()]);
    let chunked = check_request_reader(stream, limits, &chunks);
    assert_eq!(chunked, whole, "chunking changed the events");
    let bytewise = check_request_reader(stream, limits, &[1]);
    assert_eq!(bytewise, whole, "byte-at-a-time feeding changed the events");
}
