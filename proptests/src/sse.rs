//! Checks of the server-sent events decoder shared by its property tests and its fuzz
//! target: however a byte stream is cut into chunks, the decoder finds the same events
//! (or the same error), never holds more than its bound, and what it finds re-encodes
//! to a stream that decodes to the same events.

use inferd_core::sse::{SseDecoder, SseError, SseEvent};

/// What decoding a stream produced: the events, the error that stopped it, and whether
/// it ended in the middle of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The events, in order.
    pub events: Vec<SseEvent>,
    /// The error, if the stream was not valid.
    pub error: Option<SseError>,
    /// Whether the stream ended inside an event.
    pub mid_event: bool,
}

/// Decodes `bytes` fed in pieces ending at `cuts` (offsets, any order, out-of-range
/// ones ignored), checking the memory bound after every piece.
pub fn decode_chunked(bytes: &[u8], cuts: &[usize], max: usize) -> Decoded {
    let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c <= bytes.len()).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let mut d = SseDecoder::new(max);
    let mut events = Vec::new();
    let mut error = None;
    let mut at = 0;
    for cut in cuts {
        if let Err(e) = d.push(&bytes[at..cut], &mut events) {
            error = Some(e);
            break;
        }
        // A line, an event's data and its type, each within the bound.
        assert!(d.buffered() <= 3 * max, "decoder holds {} bytes, bound {max}", d.buffered());
        at = cut;
    }
    let mid_event = error.is_none() && d.is_mid_event();
    Decoded { events, error, mid_event }
}

/// Encodes events as an event stream (LF line ends), the inverse of decoding.
pub fn encode(events: &[SseEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        match e {
            SseEvent::Done => out.extend_from_slice(b"data: [DONE]\n\n"),
            SseEvent::Message { event, data } => {
                if let Some(ev) = event {
                    out.extend_from_slice(format!("event: {ev}\n").as_bytes());
                }
                for line in data.split('\n') {
                    out.extend_from_slice(format!("data: {line}\n").as_bytes());
                }
                out.push(b'\n');
            }
        }
    }
    out
}

/// Fuzz entry: arbitrary bytes, decoded whole, byte by byte and in pieces the first
/// bytes choose, must agree; valid results must survive a re-encoding.
#[doc(hidden)]
pub fn fuzz_sse(data: &[u8]) {
    let (seed, bytes) = match data.split_first() {
        Some((&s, rest)) => (s, rest),
        None => return,
    };
    // A small bound now and then, so the overflow paths are reached too.
    let max = if seed & 0x80 != 0 { 8 + usize::from(seed & 0x1f) } else { 1 << 16 };
    let whole = decode_chunked(bytes, &[], max);
    let bytewise: Vec<usize> = (0..bytes.len()).collect();
    assert_eq!(decode_chunked(bytes, &bytewise, max), whole, "byte by byte");
    let step = usize::from(seed % 7) + 1;
    let pieces: Vec<usize> = (0..bytes.len()).step_by(step).collect();
    assert_eq!(decode_chunked(bytes, &pieces, max), whole, "in pieces of {step}");
    if whole.error.is_none() {
        let again = decode_chunked(&encode(&whole.events), &[], usize::MAX / 4);
        assert_eq!(again.events, whole.events, "re-encoded");
        assert_eq!(again.error, None);
    }
}
