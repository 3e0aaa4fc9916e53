//! A sans-IO decoder for server-sent events (the `text/event-stream` format an
//! OpenAI-compatible server streams completions in): bytes in, events out.
//!
//! It follows the WHATWG event-stream rules that matter for a completion stream: lines
//! end with CRLF, LF or a lone CR (a CRLF split across two chunks is one line end);
//! lines starting with `:` are comments; `data` lines of one event are joined with `\n`;
//! an empty line dispatches the event; a leading byte-order mark is ignored; unknown
//! fields (`id`, `retry`, anything else) are skipped. The `data: [DONE]` sentinel that
//! ends an OpenAI stream is reported as [`SseEvent::Done`].
//!
//! Memory is bounded: a line or an event's data longer than the configured limit is an
//! error, not an ever-growing buffer, so an upstream that never sends a newline cannot
//! exhaust the daemon.

/// One decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SseEvent {
    /// An event with data: its `event` field (`None` when absent, the usual case) and
    /// its data lines joined with `\n`.
    Message {
        /// The `event:` field, when the server named the event type.
        event: Option<String>,
        /// The data.
        data: String,
    },
    /// The `data: [DONE]` sentinel: the server has finished the stream.
    Done,
}

/// Why the byte stream is not a valid event stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line or an event's data grew past the limit.
    #[error("event stream line or event longer than {limit} bytes")]
    TooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// An event's data or type is not UTF-8.
    #[error("event stream data is not valid UTF-8")]
    NotUtf8,
}

/// The default bound on one line and on one event's data, in bytes. A completion chunk
/// is a few hundred bytes; a megabyte leaves room for the largest sane one.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The decoder state. Feed it with [`SseDecoder::push`]; ask [`SseDecoder::is_mid_event`]
/// at the end of the stream to tell a clean end from a cut one.
#[derive(Clone, Debug)]
pub struct SseDecoder {
    max: usize,
    /// The current line, without its terminator.
    line: Vec<u8>,
    /// Data lines of the current event, each followed by `\n`.
    data: Vec<u8>,
    /// Whether a `data` field was seen in the current event (an empty one counts).
    has_data: bool,
    event: Option<Vec<u8>>,
    /// The previous chunk ended in CR: a leading LF of the next one ends no line.
    after_cr: bool,
    /// Bytes of a possible leading BOM still to check, until the first non-BOM byte.
    bom_seen: usize,
    started: bool,
    /// A `TooLong` or `NotUtf8` was returned: the stream is unusable from here on.
    failed: Option<SseError>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseDecoder {
    /// A decoder holding at most `max_event_bytes` of one line and of one event's data.
    pub fn new(max_event_bytes: usize) -> Self {
        SseDecoder {
            max: max_event_bytes.max(1),
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            event: None,
            after_cr: false,
            bom_seen: 0,
            started: false,
            failed: None,
        }
    }

    /// Decodes `bytes`, appending every event they complete to `out`. After an error
    /// every later call returns the same error: the stream cannot be resynchronised.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.push_inner(bytes, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.line = Vec::new();
            self.data = Vec::new();
        }
        result
    }

    fn push_inner(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if !self.started {
            // A BOM may itself arrive split across chunks.
            while let Some((&b, rest)) = bytes.split_first() {
                if self.bom_seen < BOM.len() && b == BOM[self.bom_seen] {
                    self.bom_seen += 1;
                    bytes = rest;
                    if self.bom_seen == BOM.len() {
                        self.started = true;
                        break;
                    }
                } else {
                    self.started = true;
                    // A partial BOM was data after all: give its bytes back.
                    let partial = BOM[..self.bom_seen].to_vec();
                    self.bom_seen = 0;
                    self.push_bytes(&partial, out)?;
                    break;
                }
            }
        }
        self.push_bytes(bytes, out)
    }

    fn push_bytes(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.extend_line(bytes)?;
                    return Ok(());
                }
                Some(i) => {
                    self.extend_line(&bytes[..i])?;
                    let cr = bytes[i] == b'\r';
                    bytes = &bytes[i + 1..];
                    if cr {
                        match bytes.first() {
                            Some(b'\n') => bytes = &bytes[1..],
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                    let line = std::mem::take(&mut self.line);
                    self.on_line(&line, out)?;
                    // Keep the allocation for the next line.
                    self.line = line;
                    self.line.clear();
                }
            }
        }
        Ok(())
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > self.max {
            return Err(SseError::TooLong { limit: self.max });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > self.max {
                    return Err(SseError::TooLong { limit: self.max });
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => self.event = Some(value.to_vec()),
            // `id`, `retry` and unknown fields mean nothing to a completion stream.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return Ok(());
        }
        self.data.pop();
        let data =
            String::from_utf8(std::mem::take(&mut self.data)).map_err(|_| SseError::NotUtf8)?;
        let event = match event {
            Some(e) => Some(String::from_utf8(e).map_err(|_| SseError::NotUtf8)?),
            None => None,
        };
        if event.is_none() && data == "[DONE]" {
            out.push(SseEvent::Done);
        } else {
            out.push(SseEvent::Message { event, data });
        }
        Ok(())
    }

    /// Whether bytes of an unfinished event are held: at the end of the stream this
    /// means the stream was cut in the middle of an event.
    pub fn is_mid_event(&self) -> bool {
        !self.line.is_empty() || self.has_data || self.event.is_some()
    }

    /// Bytes currently buffered (for the memory bound's tests).
    pub fn buffered(&self) -> usize {
        self.line.len() + self.data.len() + self.event.as_ref().map_or(0, Vec::len)
    }
}

/// Decodes a whole byte string at once: the events, then the error if one stopped it.
pub fn decode_all(bytes: &[u8], max_event_bytes: usize) -> (Vec<SseEvent>, Option<SseError>) {
    let mut d = SseDecoder::new(max_event_bytes);
    let mut out = Vec::new();
    let err = d.push(bytes, &mut out).err();
    (out, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(data: &str) -> SseEvent {
        SseEvent::Message { event: None, data: data.into() }
    }

    fn all(bytes: &[u8]) -> Vec<SseEvent> {
        let (events, err) = decode_all(bytes, DEFAULT_MAX_EVENT_BYTES);
        assert_eq!(err, None);
        events
    }

    #[test]
    fn openai_stream() {
        let s = b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
        assert_eq!(all(s), vec![msg("{\"a\":1}"), msg("{\"a\":2}"), SseEvent::Done]);
    }

    #[test]
    fn line_endings_crlf_lf_cr() {
        let want = vec![msg("x"), msg("y"), msg("z")];
        assert_eq!(all(b"data: x\r\n\r\ndata: y\n\ndata: z\r\r"), want);
        // A CRLF split across chunks is one line end, not two.
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.push(b"data: x\r", &mut out).unwrap();
        d.push(b"\ndata: y\r", &mut out).unwrap();
        d.push(b"\n\r", &mut out).unwrap();
        d.push(b"\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("x\ny")]);
        assert!(!d.is_mid_event());
    }

    #[test]
    fn comments_fields_and_multiline_data() {
        let s = b": keep-alive\nid: 7\nretry: 10\nevent: error\ndata: a\ndata:b\ndata\n\n";
        assert_eq!(
            all(s),
            vec![SseEvent::Message { event: Some("error".into()), data: "a\nb\n".into() }]
        );
        // An event with no data is not dispatched, and its type does not leak on.
        assert_eq!(all(b"event: x\n\ndata: y\n\n"), vec![msg("y")]);
        // Only one space after the colon is stripped.
        assert_eq!(all(b"data:  two\n\n"), vec![msg(" two")]);
        // `[DONE]` is the sentinel only as the whole data of an untyped event.
        assert_eq!(all(b"data: [DONE] \n\n"), vec![msg("[DONE] ")]);
    }

    #[test]
    fn bom_is_skipped_even_when_split() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.push(b"\xEF", &mut out).unwrap();
        d.push(b"\xBB\xBFdata: x\n\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("x")]);
        // A partial BOM followed by other bytes is kept as data (and is then not UTF-8).
        let (events, err) = decode_all(b"\xEFdata: x\n\n", 64);
        assert_eq!((events, err), (vec![], None), "a line whose field is not `data`");
    }

    #[test]
    fn cut_streams_are_seen() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.push(b"data: {\"a\"", &mut out).unwrap();
        assert!(d.is_mid_event());
        let mut d = SseDecoder::default();
        d.push(b"data: x\n", &mut out).unwrap();
        assert!(d.is_mid_event(), "data without the empty line that dispatches it");
        let mut d = SseDecoder::default();
        d.push(b"data: x\n\n: comment\n", &mut out).unwrap();
        assert!(!d.is_mid_event());
    }

    #[test]
    fn memory_is_bounded() {
        let mut d = SseDecoder::new(16);
        let mut out = Vec::new();
        for _ in 0..4 {
            if d.push(b"aaaaaa", &mut out).is_err() {
                break;
            }
            assert!(d.buffered() <= 16);
        }
        assert_eq!(d.push(b"x", &mut out), Err(SseError::TooLong { limit: 16 }));
        assert_eq!(d.buffered(), 0);
        // Many short data lines cannot grow one event past the bound either.
        let mut d = SseDecoder::new(16);
        let err = d.push(b"data: aaaa\ndata: bbbb\ndata: cccc\ndata: dddd\n", &mut out);
        assert_eq!(err, Err(SseError::TooLong { limit: 16 }));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        assert_eq!(decode_all(b"data: \xff\n\n", 64).1, Some(SseError::NotUtf8));
        // Split inside a character is fine.
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.push(b"data: \xc3", &mut out).unwrap();
        d.push(b"\xa9\n\n", &mut out).unwrap();
        assert_eq!(out, vec![msg("é")]);
    }
}
