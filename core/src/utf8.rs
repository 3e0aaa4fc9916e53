//! Holds back UTF-8 characters split across engine tokens.
//!
//! Engines hand out raw bytes per token; a character may straddle two tokens. The
//! assembler appends each token to its pending bytes and releases the longest valid
//! prefix, keeping an incomplete trailing sequence for the next token. Bytes that can
//! never become valid are replaced with U+FFFD so the stream stays valid UTF-8.

/// Per-generation UTF-8 reassembly.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one token's bytes; appends the text that is complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        if self.pending.is_empty() {
            // Fast path: most tokens are whole characters.
            match std::str::from_utf8(bytes) {
                Ok(s) => {
                    out.push_str(s);
                    return;
                }
                Err(_) => self.pending.extend_from_slice(bytes),
            }
        } else {
            self.pending.extend_from_slice(bytes);
        }
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid by construction; the check is free of panics.
                    if let Ok(s) = std::str::from_utf8(&rest[..valid]) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            rest = &rest[valid..];
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.drain(..len - keep);
    }

    /// Ends the stream: an incomplete trailing sequence becomes U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        if !self.pending.is_empty() {
            out.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
    }

    /// Whether bytes are held back.
    #[cfg(test)] // Only the tests ask; the module is private to the crate.
    pub fn is_holding(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_character_is_held_back() {
        let mut a = Utf8Assembler::new();
        let mut out = String::new();
        let crab = "🦀".as_bytes();
        a.push(&[b'a', crab[0]], &mut out);
        assert_eq!(out, "a");
        assert!(a.is_holding());
        a.push(&crab[1..3], &mut out);
        assert_eq!(out, "a");
        a.push(&[crab[3], b'b'], &mut out);
        assert_eq!(out, "a🦀b");
        assert!(!a.is_holding());
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let mut a = Utf8Assembler::new();
        let mut out = String::new();
        a.push(&[0xff, b'x'], &mut out);
        assert_eq!(out, "\u{fffd}x");
        a.push(&[0xe2, 0x82], &mut out);
        a.finish(&mut out);
        assert_eq!(out, "\u{fffd}x\u{fffd}");
    }
}
