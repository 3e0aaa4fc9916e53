//! NDJSON framing: an incremental, capped line decoder.
//!
//! The decoder is fed whatever chunks the transport produced. It hands out complete
//! lines (LF removed, a CR before it tolerated, blank lines skipped) and checks the cap
//! as bytes arrive, so memory per connection stays bounded by the cap however the
//! bytes are split. Bytes after a line stay buffered for the next one.

/// Default frame cap: 64 MiB (spec §1).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// What [`LineDecoder::next_line`] can find.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete, non-blank line without its line ending.
    Complete(&'a [u8]),
    /// The next line is longer than the cap; the decoder dropped it and what followed.
    TooLarge,
}

/// An incremental NDJSON line splitter with a cap on line length.
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet handed out.
    start: usize,
    /// Bytes before this index (from `start`) hold no LF; saves rescanning.
    scanned: usize,
    /// Index just past the last LF in `buf` (0 when none), so `push` can size the tail.
    tail_start: usize,
    cap: usize,
    overflow: bool,
}

impl LineDecoder {
    /// A decoder accepting lines of at most `cap` bytes (LF and a trailing CR excluded).
    pub fn new(cap: usize) -> Self {
        LineDecoder { buf: Vec::new(), start: 0, scanned: 0, tail_start: 0, cap, overflow: false }
    }

    /// Changes the cap for lines not yet complete (an authenticated TCP peer moves from
    /// the 4 KiB auth cap to the frame cap).
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// Appends bytes read from the transport. Never keeps more than the cap (plus a CR)
    /// of an unfinished line: past that, the line is dropped and [`Line::TooLarge`]
    /// comes out once the lines before it are taken.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.overflow {
            return;
        }
        self.compact();
        while !data.is_empty() {
            // Allow one byte over the cap: a CR that the LF after it will strip.
            let room = (self.cap + 1).saturating_sub(self.buf.len() - self.tail_start);
            match data.iter().position(|&b| b == b'\n') {
                Some(i) if i <= room => {
                    self.buf.extend_from_slice(&data[..=i]);
                    self.tail_start = self.buf.len();
                    data = &data[i + 1..];
                }
                _ if data.len() <= room => {
                    self.buf.extend_from_slice(data);
                    return;
                }
                _ => {
                    // The unfinished line outgrows the cap: keep the lines before it only.
                    self.buf.truncate(self.tail_start);
                    // What was scanned of the dropped line is gone too.
                    self.scanned = 0;
                    self.overflow = true;
                    return;
                }
            }
        }
    }

    /// The next complete non-blank line, or `TooLarge` once the lines before an oversize
    /// one are taken. `None` when more bytes are needed.
    pub fn next_line(&mut self) -> Option<Line<'_>> {
        loop {
            let rest = &self.buf[self.start..];
            let Some(rel) = rest[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = rest.len();
                if self.overflow && self.start == self.buf.len() {
                    return Some(Line::TooLarge);
                }
                return None;
            };
            let end = self.start + self.scanned + rel;
            let line_start = self.start;
            self.start = end + 1;
            self.scanned = 0;
            let mut line = &self.buf[line_start..end];
            if let [head @ .., b'\r'] = line {
                line = head;
            }
            if line.len() > self.cap {
                // A line of exactly cap + 1 bytes with no CR to strip got in through the
                // CR allowance; blank or not, it is over the cap like a longer one.
                self.buf.truncate(line_start);
                self.start = line_start;
                self.tail_start = line_start;
                self.overflow = true;
                return Some(Line::TooLarge);
            }
            if line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
                continue;
            }
            return Some(Line::Complete(&self.buf[line_start..line_start + line.len()]));
        }
    }

    /// Whether bytes of an unfinished, non-blank line are buffered.
    pub fn has_partial(&self) -> bool {
        self.buf[self.start..].iter().any(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            || self.overflow
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether a complete line (possibly blank) is buffered.
    pub fn has_complete_line(&self) -> bool {
        self.tail_start > self.start || (self.overflow && self.start == self.buf.len())
    }

    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.tail_start = 0;
        } else {
            self.buf.drain(..self.start);
            self.tail_start = self.tail_start.saturating_sub(self.start);
        }
        self.start = 0;
        // Release memory a past large line left behind.
        if self.buf.capacity() > 64 * 1024 && self.buf.len() < 16 * 1024 {
            self.buf.shrink_to(16 * 1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(dec: &mut LineDecoder) -> Vec<Result<Vec<u8>, ()>> {
        let mut out = Vec::new();
        while let Some(l) = dec.next_line() {
            match l {
                Line::Complete(l) => out.push(Ok(l.to_vec())),
                Line::TooLarge => {
                    out.push(Err(()));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn has_complete_line_tracks_lines_and_the_pending_overflow() {
        let mut d = LineDecoder::new(8);
        assert!(!d.has_complete_line());
        d.push(b"abc");
        assert!(!d.has_complete_line());
        d.push(b"\n");
        assert!(d.has_complete_line());
        assert_eq!(d.next_line(), Some(Line::Complete(b"abc")));
        assert!(!d.has_complete_line());
        d.push(b"ok\n0123456789");
        assert!(d.has_complete_line());
        assert_eq!(d.next_line(), Some(Line::Complete(b"ok")));
        // What is left to hand out is the overflow.
        assert!(d.has_complete_line());
        assert_eq!(d.next_line(), Some(Line::TooLarge));
    }

    /// Taken lines do not pile up, and the memory of a past large line is given back,
    /// while a moderate buffer is kept rather than reallocated over and over.
    #[test]
    fn memory_follows_what_is_buffered() {
        let mut d = LineDecoder::new(1 << 20);
        for _ in 0..1000 {
            d.push(&[b'x'; 99]);
            d.push(b"\n");
            assert!(matches!(d.next_line(), Some(Line::Complete(_))));
        }
        assert!(d.buf.len() <= 200, "{} bytes held for nothing", d.buf.len());
        let big = vec![b'y'; 512 * 1024];
        d.push(&big);
        d.push(b"\n");
        assert!(matches!(d.next_line(), Some(Line::Complete(_))));
        d.push(b"small");
        assert!(d.buf.capacity() <= 64 * 1024, "capacity {}", d.buf.capacity());
        let mut d = LineDecoder::new(1 << 20);
        d.push(&[b'z'; 20 * 1024]);
        d.push(b"\n");
        assert!(matches!(d.next_line(), Some(Line::Complete(_))));
        let kept = d.buf.capacity();
        d.push(b"small");
        assert_eq!(d.buf.capacity(), kept, "a 20 KiB buffer is kept");
    }

    #[test]
    fn splits_lines_across_chunks() {
        let mut d = LineDecoder::new(100);
        d.push(b"ab");
        assert_eq!(d.buffered(), 2);
        assert!(lines(&mut d).is_empty());
        assert!(d.has_partial());
        d.push(b"c\nde");
        assert_eq!(lines(&mut d), vec![Ok(b"abc".to_vec())]);
        d.push(b"f\r\n\n  \r\n\tx\n");
        assert_eq!(lines(&mut d), vec![Ok(b"def".to_vec()), Ok(b"\tx".to_vec())]);
        assert!(!d.has_partial());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn keeps_bytes_after_a_line() {
        let mut d = LineDecoder::new(100);
        d.push(b"one\ntwo\nthr");
        assert_eq!(d.next_line(), Some(Line::Complete(b"one")));
        assert!(d.has_complete_line());
        d.push(b"ee\n");
        assert_eq!(d.next_line(), Some(Line::Complete(b"two")));
        assert_eq!(d.next_line(), Some(Line::Complete(b"three")));
        assert_eq!(d.next_line(), None);
    }

    #[test]
    fn cap_is_inclusive_and_checked_as_bytes_arrive() {
        let mut d = LineDecoder::new(4);
        d.push(b"abcd\n");
        assert_eq!(lines(&mut d), vec![Ok(b"abcd".to_vec())]);
        d.push(b"abcd\r\n");
        assert_eq!(lines(&mut d), vec![Ok(b"abcd".to_vec())]);
        d.push(b"ok\n");
        assert_eq!(d.next_line(), Some(Line::Complete(b"ok")));
        d.push(b"abc");
        d.push(b"de");
        assert!(d.buffered() <= 5, "buffered {}", d.buffered());
        d.push(&[b'x'; 1000]);
        assert!(d.buffered() <= 5);
        assert_eq!(lines(&mut d), vec![Err(())]);
    }

    #[test]
    fn cap_never_exceeded_by_one_big_chunk() {
        let mut d = LineDecoder::new(10);
        let mut big = vec![b'a'; 1 << 20];
        big.push(b'\n');
        d.push(&big);
        assert!(d.buffered() <= 11);
        assert_eq!(d.next_line(), Some(Line::TooLarge));
    }

    #[test]
    fn cr_only_at_line_end_is_stripped() {
        let mut d = LineDecoder::new(3);
        d.push(b"a\rb\n");
        assert_eq!(lines(&mut d), vec![Ok(b"a\rb".to_vec())]);
        d.push(b"abc\r\r\n");
        assert_eq!(lines(&mut d), vec![Err(())]);
    }

    #[test]
    fn overflow_after_a_scanned_partial_line() {
        let mut d = LineDecoder::new(5);
        d.push(b"abc");
        assert_eq!(d.next_line(), None);
        d.push(b"defghij");
        assert_eq!(d.next_line(), Some(Line::TooLarge));
    }

    #[test]
    fn blank_lines_over_the_cap_are_too_large() {
        let mut d = LineDecoder::new(3);
        d.push(b"    \n");
        assert_eq!(d.next_line(), Some(Line::TooLarge));
        let mut d = LineDecoder::new(3);
        d.push(b"     \n");
        assert_eq!(d.next_line(), Some(Line::TooLarge));
    }

    #[test]
    fn blank_partial_is_not_partial() {
        let mut d = LineDecoder::new(10);
        d.push(b"  \r");
        assert!(!d.has_partial());
        d.push(b"x");
        assert!(d.has_partial());
    }
}
