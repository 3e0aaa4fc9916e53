//! Stop sequences: ends a generated text stream before the first match of any of a few
//! client-given strings.
//!
//! Text arrives in pieces of any size. The matcher releases what can no longer be part
//! of a match and holds back the longest tail that could still begin one, so the match
//! itself is never emitted, whatever the split. The sequences are compiled into a small
//! Aho-Corasick automaton: its state is exactly "the longest tail that is a prefix of
//! some sequence", so the held-back length is the state's depth, and each byte costs
//! amortised O(1) (a fail-link walk only undoes depth that earlier bytes added).
//!
//! Which match wins when several overlap: the one that ends first in the text; among
//! those ending at the same byte, the longest (it starts earliest). That rule depends
//! only on the text, never on how it was split into pieces.

use crate::utf8::Utf8Assembler;

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence accepted, in bytes; bounds the text held back.
pub const MAX_STOP_BYTES: usize = 512;

/// Why a set of stop sequences was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// More sequences than [`MAX_STOP_SEQUENCES`].
    #[error("at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {0}")]
    TooMany(usize),
    /// An empty sequence would stop before the first byte.
    #[error("stop sequences must not be empty")]
    Empty,
    /// A sequence longer than [`MAX_STOP_BYTES`].
    #[error("a stop sequence is {0} bytes, more than {MAX_STOP_BYTES}")]
    TooLong(usize),
}

/// One trie node of the automaton.
#[derive(Clone, Debug)]
struct Node {
    /// Outgoing edges; a node has at most one per sequence, so a scan is cheap.
    edges: Vec<(u8, u32)>,
    /// The node of the longest proper suffix that is also a prefix of some sequence.
    fail: u32,
    /// Length of the prefix this node stands for.
    depth: u32,
    /// Length of the longest sequence that ends here (directly or through fail links);
    /// 0 when none does.
    matched: u32,
}

impl Node {
    fn new(depth: u32) -> Node {
        Node { edges: Vec::new(), fail: 0, depth, matched: 0 }
    }

    fn child(&self, b: u8) -> Option<u32> {
        self.edges.iter().find(|&&(e, _)| e == b).map(|&(_, n)| n)
    }
}

/// A streaming stop-sequence matcher for one generation.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    nodes: Vec<Node>,
    state: u32,
    /// Text not yet released; the live part starts at `start`. Released bytes stay until
    /// they are at least half the buffer, so dropping them is amortised O(1) per byte.
    held: String,
    start: usize,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `sequences` (none is allowed: everything passes straight through).
    pub fn new<S: AsRef<str>>(sequences: &[S]) -> Result<StopMatcher, StopError> {
        if sequences.len() > MAX_STOP_SEQUENCES {
            return Err(StopError::TooMany(sequences.len()));
        }
        let mut nodes = vec![Node::new(0)];
        for s in sequences {
            let s = s.as_ref().as_bytes();
            if s.is_empty() {
                return Err(StopError::Empty);
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(StopError::TooLong(s.len()));
            }
            let mut at = 0usize;
            for &b in s {
                at = match nodes[at].child(b) {
                    Some(n) => n as usize,
                    None => {
                        let n = nodes.len();
                        let depth = nodes[at].depth + 1;
                        nodes.push(Node::new(depth));
                        // At most 4 × 512 nodes, so the index fits in u32.
                        nodes[at].edges.push((b, n as u32));
                        n
                    }
                };
            }
            nodes[at].matched = nodes[at].depth;
        }
        // Breadth-first, so every fail target is final before its users read it.
        let mut queue = std::collections::VecDeque::new();
        for &(_, n) in &nodes[0].edges {
            queue.push_back(n);
        }
        while let Some(n) = queue.pop_front() {
            let edges = nodes[n as usize].edges.clone();
            for (b, child) in edges {
                let fail = if n == 0 { 0 } else { step(&nodes, nodes[n as usize].fail, b) };
                let inherited = nodes[fail as usize].matched;
                let c = &mut nodes[child as usize];
                c.fail = fail;
                c.matched = c.matched.max(inherited);
                queue.push_back(child);
            }
        }
        Ok(StopMatcher { nodes, state: 0, held: String::new(), start: 0, stopped: false })
    }

    /// Whether there are no sequences to look for.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Feeds the next piece of text; appends to `out` what is safe to emit. Returns true
    /// once a sequence matched: the text before the match has been emitted, the match
    /// and anything after it never will be, and later pieces are ignored.
    pub fn push(&mut self, piece: &str, out: &mut String) -> bool {
        if self.stopped {
            return true;
        }
        if self.is_empty() {
            out.push_str(piece);
            return false;
        }
        let from = self.held.len();
        self.held.push_str(piece);
        for (i, &b) in self.held.as_bytes()[from..].iter().enumerate() {
            self.state = step(&self.nodes, self.state, b);
            let node = &self.nodes[self.state as usize];
            if node.matched > 0 {
                let end = from + i + 1;
                // The match starts with a sequence's first byte, so on a char boundary;
                // it starts at or after `start`, since the bytes before it were released
                // only when they could no longer begin a match.
                let cut = end - node.matched as usize;
                out.push_str(self.held.get(self.start..cut).unwrap_or_default());
                self.stopped = true;
                self.held = String::new();
                self.start = 0;
                return true;
            }
        }
        // Hold back the longest tail that is a prefix of a sequence (the state's depth);
        // it starts with a sequence's first byte, so the cut is on a char boundary.
        let keep_from = self.held.len() - self.nodes[self.state as usize].depth as usize;
        out.push_str(self.held.get(self.start..keep_from).unwrap_or_default());
        self.start = keep_from;
        if self.start * 2 >= self.held.len() {
            self.held.drain(..self.start);
            self.start = 0;
        }
        false
    }

    /// Ends the stream: appends the held-back text (nothing once stopped).
    pub fn finish(&mut self, out: &mut String) {
        if !self.stopped {
            out.push_str(self.held.get(self.start..).unwrap_or_default());
        }
        self.held = String::new();
        self.start = 0;
        self.state = 0;
    }

    /// Whether a sequence has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Bytes held back, waiting to see whether a match follows.
    pub fn held_bytes(&self) -> usize {
        self.held.len() - self.start
    }
}

/// Engine token bytes in, stop-filtered text out: reassembles UTF-8 characters split
/// across tokens (so every piece handed on is valid UTF-8), then holds back what could
/// start a stop sequence. What a streaming API sends as content deltas.
#[derive(Debug)]
pub struct TokenText {
    utf8: Utf8Assembler,
    stop: StopMatcher,
    piece: String,
}

impl TokenText {
    /// A filter ending the text at the first match of `stop`.
    pub fn new(stop: StopMatcher) -> TokenText {
        TokenText { utf8: Utf8Assembler::new(), stop, piece: String::new() }
    }

    /// Feeds one token's bytes; appends the text now safe to emit to `out`. Returns true
    /// once a stop sequence matched: the generation should be cancelled, and the answer
    /// ends with `finish_reason` `stop`.
    pub fn push(&mut self, token: &[u8], out: &mut String) -> bool {
        if self.stop.is_stopped() {
            return true;
        }
        self.piece.clear();
        self.utf8.push(token, &mut self.piece);
        self.stop.push(&self.piece, out)
    }

    /// Ends the text: appends what was held back (an incomplete trailing character
    /// becomes U+FFFD, as on protocol v1), unless a stop sequence matched.
    pub fn finish(&mut self, out: &mut String) {
        if !self.stop.is_stopped() {
            self.piece.clear();
            self.utf8.finish(&mut self.piece);
            self.stop.push(&self.piece, out);
        }
        self.stop.finish(out);
    }

    /// Whether a stop sequence matched.
    pub fn is_stopped(&self) -> bool {
        self.stop.is_stopped()
    }
}

/// The automaton's transition: follow fail links until an edge for `b` exists.
fn step(nodes: &[Node], mut state: u32, b: u8) -> u32 {
    loop {
        let node = &nodes[state as usize];
        if let Some(n) = node.child(b) {
            return n;
        }
        if state == 0 {
            return 0;
        }
        state = node.fail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text before the first match under the module's rule, by brute force.
    fn reference(text: &str, seqs: &[&str]) -> (String, bool) {
        for end in 1..=text.len() {
            let cut = seqs
                .iter()
                .filter(|s| text.as_bytes()[..end].ends_with(s.as_bytes()))
                .map(|s| end - s.len())
                .min();
            if let Some(cut) = cut {
                return (text[..cut].to_owned(), true);
            }
        }
        (text.to_owned(), false)
    }

    fn run(pieces: &[&str], seqs: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(seqs).unwrap();
        let mut out = String::new();
        let mut stopped = false;
        for p in pieces {
            stopped = m.push(p, &mut out);
        }
        m.finish(&mut out);
        (out, stopped)
    }

    #[test]
    fn match_split_across_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(&["END"]).unwrap();
        let mut out = String::new();
        assert!(!m.push("hello E", &mut out));
        assert_eq!(out, "hello ");
        assert_eq!(m.held_bytes(), 1);
        assert!(!m.push("N", &mut out));
        assert_eq!(out, "hello ");
        assert!(m.push("Dgame", &mut out));
        assert_eq!(out, "hello ");
        assert!(m.push("more", &mut out));
        m.finish(&mut out);
        assert_eq!(out, "hello ");
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(&["END"]).unwrap();
        let mut out = String::new();
        m.push("EN", &mut out);
        assert_eq!(out, "");
        m.push("x", &mut out);
        assert_eq!(out, "ENx");
        m.push("EE", &mut out);
        assert_eq!(out, "ENxE");
        m.finish(&mut out);
        assert_eq!(out, "ENxEE");
        assert!(!m.is_stopped());
    }

    #[test]
    fn earliest_ending_match_wins_then_longest() {
        assert_eq!(run(&["abcd"], &["abcd", "bc"]), ("a".into(), true));
        assert_eq!(run(&["xabcd"], &["abc", "bc"]), ("x".into(), true));
        assert_eq!(run(&["a", "a", "a", "b"], &["aab"]), ("a".into(), true));
        assert_eq!(run(&["she said"], &["he", "she", "hers"]), ("".into(), true));
    }

    #[test]
    fn multibyte_text_and_sequences() {
        assert_eq!(run(&["héllo wörld"], &["ö"]), ("héllo w".into(), true));
        assert_eq!(run(&["日本", "語です"], &["語で"]), ("日本".into(), true));
        assert_eq!(run(&["日本", "語"], &["本日"]), ("日本語".into(), false));
    }

    #[test]
    fn no_sequences_pass_through() {
        let mut m = StopMatcher::new::<&str>(&[]).unwrap();
        assert!(m.is_empty());
        let mut out = String::new();
        assert!(!m.push("abc", &mut out));
        assert_eq!((out.as_str(), m.held_bytes()), ("abc", 0));
    }

    #[test]
    fn bad_sets_are_refused() {
        assert_eq!(
            StopMatcher::new(&["a", "b", "c", "d", "e"]).unwrap_err(),
            StopError::TooMany(5)
        );
        assert_eq!(StopMatcher::new(&["a", ""]).unwrap_err(), StopError::Empty);
        let long = "x".repeat(MAX_STOP_BYTES + 1);
        assert_eq!(StopMatcher::new(&[long]).unwrap_err(), StopError::TooLong(MAX_STOP_BYTES + 1));
        assert!(StopMatcher::new(&["x".repeat(MAX_STOP_BYTES)]).is_ok());
    }

    #[test]
    fn held_back_text_is_bounded_by_the_longest_sequence() {
        let seq = format!("{}b", "a".repeat(20));
        let mut m = StopMatcher::new(&[seq.as_str()]).unwrap();
        let mut out = String::new();
        for _ in 0..1000 {
            m.push("a", &mut out);
            assert!(m.held_bytes() <= 20);
        }
        assert_eq!(out.len(), 1000 - 20);
        assert!(m.push("b", &mut out));
        assert_eq!(out.len(), 1000 - 20);
    }

    #[test]
    fn every_split_agrees_with_the_reference() {
        let cases: &[(&str, &[&str])] = &[
            ("the end is near, THE END", &["END", "near,"]),
            ("aaaaaaab", &["aab", "ab", "aaaab"]),
            ("abababc", &["ababc", "bac"]),
            ("no match here", &["xyz", "herf"]),
            ("ßü→🦀x", &["🦀", "→🦀y"]),
        ];
        for &(text, seqs) in cases {
            let want = reference(text, seqs);
            let bounds: Vec<usize> =
                (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
            // Every way to cut the text in two and three pieces.
            for &a in &bounds {
                for &b in bounds.iter().filter(|&&b| b >= a) {
                    let got = run(&[&text[..a], &text[a..b], &text[b..]], seqs);
                    assert_eq!(got, want, "{text:?} cut at {a},{b}");
                }
            }
        }
    }

    #[test]
    fn token_bytes_split_inside_characters() {
        let text = "a🦀b STOP c";
        let mut t = TokenText::new(StopMatcher::new(&["🦀b S", "zzz"]).unwrap());
        let mut out = String::new();
        let mut stopped = false;
        for b in text.as_bytes() {
            stopped = t.push(&[*b], &mut out);
            if stopped {
                break;
            }
        }
        assert!(stopped && t.is_stopped());
        t.finish(&mut out);
        assert_eq!(out, "a");
        assert!(t.push(b"more", &mut out));
        assert_eq!(out, "a");

        let mut t = TokenText::new(StopMatcher::new::<&str>(&[]).unwrap());
        let mut out = String::new();
        let crab = "🦀".as_bytes();
        assert!(!t.push(&crab[..2], &mut out));
        assert_eq!(out, "", "half a character is held back");
        t.push(&crab[2..], &mut out);
        assert_eq!(out, "🦀");
        t.push(&crab[..1], &mut out);
        t.finish(&mut out);
        assert_eq!(out, "🦀\u{fffd}");
    }
}
