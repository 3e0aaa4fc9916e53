//! NDJSON framing: an incremental, capped line decoder.
//!
//! The decoder is fed whatever chunks the transport produced. It hands out complete
//! lines (LF removed, a CR before it tolerated, blank lines skipped) and checks the cap
//! as bytes arrive, so memory per connection stays bounded by the cap however the
//! bytes are split. Bytes after a line stay buffered for the next one.
//!
//! Every call costs time in proportion to the bytes it is given or hands out, never to
//! what is already buffered: a peer streaming a huge line in small pieces must not make
//! each read rescan the line so far. [`LineDecoder::work`] counts what was examined, so
//! tests and fuzzers can hold the decoder to that.

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
    /// Bytes examined, copied or moved so far (see [`LineDecoder::work`]).
    work: u64,
}

impl LineDecoder {
    /// A decoder accepting lines of at most `cap` bytes (LF and a trailing CR excluded).
    pub fn new(cap: usize) -> Self {
        LineDecoder {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            tail_start: 0,
            cap,
            overflow: false,
            work: 0,
        }
    }

    /// Changes the cap for lines not yet complete (an authenticated TCP peer moves from
    /// the 4 KiB auth cap to the frame cap).
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// Appends bytes read from the transport. Never keeps an unfinished line once it is
    /// known to be over the cap: past `cap` bytes only a CR (which an LF after it would
    /// strip) may wait, so `cap + 1` bytes not ending in CR, or `cap + 2` bytes, drop the
    /// line, and [`Line::TooLarge`] comes out once the lines before it are taken.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.overflow {
            return;
        }
        self.compact();
        while !data.is_empty() {
            let held = self.buf.len() - self.tail_start;
            // Allow one byte over the cap: a CR that the LF after it will strip.
            let room = (self.cap + 1).saturating_sub(held);
            // An LF further away than `room + 1` could not end an acceptable line, so the
            // search never looks past that: the cost follows what is kept.
            let window = &data[..data.len().min(room + 1)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.work += 2 * (i as u64 + 1);
                    self.buf.extend_from_slice(&data[..=i]);
                    self.tail_start = self.buf.len();
                    data = &data[i + 1..];
                }
                None if data.len() <= room => {
                    self.work += 2 * data.len() as u64;
                    self.buf.extend_from_slice(data);
                    let over_by_a_non_cr =
                        held + data.len() == self.cap + 1 && data.last() != Some(&b'\r');
                    if over_by_a_non_cr {
                        self.drop_tail();
                    }
                    return;
                }
                None => {
                    self.work += window.len() as u64;
                    self.drop_tail();
                    return;
                }
            }
        }
    }

    /// The unfinished line outgrew the cap: keeps the lines before it only.
    fn drop_tail(&mut self) {
        self.buf.truncate(self.tail_start);
        // What was scanned of the dropped line is gone too.
        self.scanned = self.scanned.min(self.buf.len() - self.start);
        self.overflow = true;
    }

    /// The next complete non-blank line, or `TooLarge` once the lines before an oversize
    /// one are taken. `None` when more bytes are needed.
    pub fn next_line(&mut self) -> Option<Line<'_>> {
        loop {
            let rest = &self.buf[self.start..];
            let Some(rel) = rest[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.work += (rest.len() - self.scanned) as u64;
                self.scanned = rest.len();
                if self.overflow && self.start == self.buf.len() {
                    return Some(Line::TooLarge);
                }
                return None;
            };
            self.work += rel as u64 + 1;
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
            self.work += line.len() as u64;
            if line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
                continue;
            }
            return Some(Line::Complete(&self.buf[line_start..line_start + line.len()]));
        }
    }

    /// Whether bytes of an unfinished line are buffered, blank ones included (a line of
    /// spaces is still a line the peer has to finish), or an oversize line is pending.
    pub fn has_partial(&self) -> bool {
        self.buf.len() > self.tail_start || self.overflow
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether a complete line (possibly blank) is buffered.
    pub fn has_complete_line(&self) -> bool {
        self.tail_start > self.start || (self.overflow && self.start == self.buf.len())
    }

    /// Bytes examined, copied or moved since the decoder was made. Stays within a small
    /// multiple of the bytes pushed whatever the chunking: the measure tests and fuzzers
    /// use to catch work that grows with what is buffered (wall time would be flaky).
    pub fn work(&self) -> u64 {
        self.work
    }

    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        let kept = self.buf.len() - self.start;
        if kept == 0 {
            self.buf.clear();
            self.tail_start = 0;
        } else if kept <= self.start {
            // Moving no more than was handed out keeps the moves linear in the input,
            // however the caller interleaves pushes and takes.
            self.work += kept as u64;
            self.buf.drain(..self.start);
            self.tail_start = self.tail_start.saturating_sub(self.start);
        } else {
            return;
        }
        self.start = 0;
        // Release memory a past large line left behind.
        if self.buf.capacity() > 64 * 1024 && self.buf.len() < 16 * 1024 {
            self.work += self.buf.len() as u64;
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

    /// A line of spaces is unfinished like any other: the daemon's read timeout must
    /// apply to it (this used to say the opposite, and let slow blank senders stay).
    #[test]
    fn blank_partial_is_partial() {
        let mut d = LineDecoder::new(10);
        assert!(!d.has_partial());
        d.push(b"  \r");
        assert_eq!(d.next_line(), None);
        assert!(d.has_partial());
        d.push(b"\n");
        assert_eq!(d.next_line(), None, "a blank line is skipped");
        assert!(!d.has_partial(), "nothing is left after the LF");
        d.push(b"\t");
        assert!(d.has_partial());
    }

    #[test]
    fn cap_plus_one_without_a_cr_is_over_at_once() {
        let mut d = LineDecoder::new(4);
        d.push(b"ok\nabcde");
        assert_eq!(d.next_line(), Some(Line::Complete(b"ok")));
        assert_eq!(d.next_line(), Some(Line::TooLarge), "no LF needed to know");
        assert!(d.buffered() <= 5);
        // The same, arriving a byte at a time.
        let mut d = LineDecoder::new(4);
        for &b in b"abcd" {
            d.push(&[b]);
            assert_eq!(d.next_line(), None);
        }
        d.push(b" ");
        assert_eq!(d.next_line(), Some(Line::TooLarge));
    }

    #[test]
    fn cap_plus_one_ending_in_cr_waits_for_the_next_byte() {
        let mut d = LineDecoder::new(4);
        d.push(b"abcd\r");
        assert_eq!(d.next_line(), None, "the CR may be stripped by an LF");
        assert!(d.has_partial());
        d.push(b"\n");
        assert_eq!(d.next_line(), Some(Line::Complete(b"abcd")));
        d.push(b"abcd\r");
        assert_eq!(d.next_line(), None);
        d.push(b"x");
        assert_eq!(d.next_line(), Some(Line::TooLarge), "cap + 2 bytes without an LF");
        // A CR inside the line is no allowance.
        let mut d = LineDecoder::new(4);
        d.push(b"ab\rcd");
        assert_eq!(d.next_line(), Some(Line::TooLarge));
    }

    /// The regression of a partial line of spaces: every read used to rescan the whole
    /// line so far. Work stays a small multiple of the bytes pushed.
    #[test]
    fn work_is_linear_in_a_long_unfinished_line() {
        for fill in [b' ', b'x'] {
            let n = 20_000;
            let mut d = LineDecoder::new(n + 10);
            for _ in 0..n {
                d.push(&[fill]);
                assert_eq!(d.next_line(), None);
                assert!(d.has_partial());
            }
            assert!(d.work() <= 6 * n as u64, "work {} for {n} bytes", d.work());
        }
    }

    /// Taking one line between pushes while many are pending moves no byte twice.
    #[test]
    fn work_is_linear_when_lines_are_taken_one_by_one() {
        let mut d = LineDecoder::new(100);
        let mut pushed = 0;
        d.push(&b"abcdefgh\n".repeat(1000));
        pushed += 9000;
        for _ in 0..1000 {
            d.push(b"x");
            pushed += 1;
            assert!(matches!(d.next_line(), Some(Line::Complete(_))));
        }
        assert!(d.work() <= 6 * pushed, "work {} for {pushed} bytes", d.work());
    }
}
