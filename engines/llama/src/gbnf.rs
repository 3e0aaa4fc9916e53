//! A syntax check of GBNF grammars, run before llama.cpp sees them.
//!
//! llama.cpp's grammar parser prints a grammar it cannot parse, verbatim, to stderr
//! (`fprintf`, not its log callback), so a client's grammar would reach the daemon's
//! stderr unredacted. This recogniser accepts only what that parser accepts without
//! throwing (syntax, escapes, repetition limits, defined rules), so a grammar that
//! passes here never takes that path. It is iterative: nesting depth costs no stack.

use std::collections::HashSet;

/// llama.cpp's limit on repetitions and on the rules a repetition may multiply.
const MAX_REPETITION: u64 = 2000;

/// The state of one sequence (one alternative) being read.
#[derive(Clone, Copy)]
struct Sequence {
    /// Whether an item precedes, so a repetition operator has something to repeat.
    has_item: bool,
    /// How many rules the preceding item stands for (llama.cpp multiplies this by a
    /// repetition's count and refuses more than [`MAX_REPETITION`]).
    item_rules: u64,
    /// For a group: the symbols defined before it opened.
    symbols_before: usize,
}

/// Reads one grammar; `single_token` says whether a `<...>` token text is exactly one
/// token of the model.
struct Reader<'a> {
    src: &'a [u8],
    pos: usize,
    /// Rule names seen (defined or referenced).
    names: HashSet<&'a [u8]>,
    /// Rule names defined.
    defined: HashSet<&'a [u8]>,
    /// Rules llama.cpp synthesizes for groups and repetitions.
    synthesized: usize,
    single_token: &'a dyn Fn(&[u8]) -> bool,
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl<'a> Reader<'a> {
    fn peek(&self) -> u8 {
        self.src.get(self.pos).copied().unwrap_or(0)
    }

    fn at(&self, offset: usize) -> u8 {
        self.src.get(self.pos + offset).copied().unwrap_or(0)
    }

    fn symbols(&self) -> usize {
        self.names.len() + self.synthesized
    }

    fn error(&self, what: &str) -> String {
        format!("{what} at byte {}", self.pos)
    }

    /// Skips blanks and comments, and line ends too when `newlines`.
    fn space(&mut self, newlines: bool) {
        loop {
            match self.peek() {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newlines => self.pos += 1,
                b'#' => {
                    while !matches!(self.peek(), 0 | b'\r' | b'\n') {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn name(&mut self) -> Result<&'a [u8], String> {
        let start = self.pos;
        while is_word(self.peek()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expecting a name"));
        }
        Ok(&self.src[start..self.pos])
    }

    fn int(&mut self) -> Result<u64, String> {
        let start = self.pos;
        while self.peek().is_ascii_digit() {
            self.pos += 1;
        }
        std::str::from_utf8(&self.src[start..self.pos])
            .ok()
            .and_then(|digits| digits.parse().ok())
            .ok_or_else(|| self.error("expecting an integer that fits 64 bits"))
    }

    /// One character of a literal or class, escapes included.
    fn char(&mut self) -> Result<(), String> {
        match self.peek() {
            0 => Err(self.error("unexpected end")),
            b'\\' => {
                let hex = match self.at(1) {
                    b'x' => 2,
                    b'u' => 4,
                    b'U' => 8,
                    b't' | b'r' | b'n' | b'\\' | b'"' | b'[' | b']' | b'-' => 0,
                    _ => return Err(self.error("unknown escape")),
                };
                self.pos += 2;
                for _ in 0..hex {
                    if !self.peek().is_ascii_hexdigit() {
                        return Err(self.error("expecting hex digits"));
                    }
                    self.pos += 1;
                }
                Ok(())
            }
            c => {
                // The text is UTF-8, so the character's length follows from its first byte.
                self.pos += match c {
                    0xF0.. => 4,
                    0xE0.. => 3,
                    0xC0.. => 2,
                    _ => 1,
                };
                Ok(())
            }
        }
    }

    /// A `<[id]>` or `<text>` token, after an optional `!`.
    fn token(&mut self) -> Result<(), String> {
        let start = self.pos;
        self.pos += 1; // '<'
        if self.peek() == b'[' {
            self.pos += 1;
            if !self.peek().is_ascii_digit() || self.int()? > u64::from(u32::MAX) {
                return Err(self.error("expecting a 32-bit token id"));
            }
            if self.peek() != b']' || self.at(1) != b'>' {
                return Err(self.error("expecting ']>'"));
            }
            self.pos += 2;
            return Ok(());
        }
        while !matches!(self.peek(), 0 | b'>') {
            self.pos += 1;
        }
        if self.peek() != b'>' {
            return Err(self.error("expecting '>'"));
        }
        self.pos += 1;
        if !(self.single_token)(&self.src[start..self.pos]) {
            return Err(self.error("a <token> that is not one token of the model"));
        }
        Ok(())
    }

    /// Applies a repetition `{min,max}` (`max` `None`: unbounded) to the preceding item.
    fn repeat(&mut self, seq: &mut Sequence, min: u64, max: Option<u64>) -> Result<(), String> {
        if !seq.has_item {
            return Err(self.error("expecting an item before a repetition"));
        }
        if min > MAX_REPETITION {
            return Err(self.error("too many repetitions"));
        }
        // llama.cpp reads a larger maximum as unbounded.
        let max = max.filter(|&m| m <= MAX_REPETITION);
        if max.is_some_and(|m| m < min) {
            return Err(self.error("a repetition's maximum is below its minimum"));
        }
        let count = match max {
            Some(m) if m > 0 => m,
            _ => min.max(1),
        };
        if seq.item_rules.saturating_mul(count) > MAX_REPETITION {
            return Err(self.error("the repetition makes too many rules"));
        }
        let optional = max.map_or(1, |m| m - min);
        self.synthesized += usize::try_from(optional).unwrap_or(usize::MAX);
        seq.item_rules *= count;
        if min == 0 && optional == 0 {
            // `{0}` leaves nothing behind to repeat again.
            seq.has_item = false;
        }
        Ok(())
    }

    /// A rule's alternatives, up to the end of its last line.
    fn body(&mut self) -> Result<(), String> {
        let fresh = |symbols_before| Sequence { has_item: false, item_rules: 1, symbols_before };
        let mut open: Vec<Sequence> = Vec::new();
        let mut seq = fresh(0);
        loop {
            let nested = !open.is_empty();
            let item = |seq: &mut Sequence| {
                seq.has_item = true;
                seq.item_rules = 1;
            };
            match self.peek() {
                b'"' => {
                    self.pos += 1;
                    while self.peek() != b'"' {
                        self.char()?;
                    }
                    self.pos += 1;
                    item(&mut seq);
                }
                b'[' => {
                    self.pos += 1;
                    if self.peek() == b'^' {
                        self.pos += 1;
                    }
                    while self.peek() != b']' {
                        self.char()?;
                        if self.peek() == b'-' && self.at(1) != b']' {
                            self.pos += 1;
                            self.char()?;
                        }
                    }
                    self.pos += 1;
                    item(&mut seq);
                }
                b'<' => {
                    self.token()?;
                    item(&mut seq);
                }
                b'!' => {
                    self.pos += 1;
                    if self.peek() != b'<' {
                        return Err(self.error("expecting '<' after '!'"));
                    }
                    self.token()?;
                    item(&mut seq);
                }
                c if is_word(c) => {
                    let name = self.name()?;
                    self.names.insert(name);
                    item(&mut seq);
                }
                b'(' => {
                    self.pos += 1;
                    self.space(true);
                    let before = self.symbols();
                    self.synthesized += 1;
                    open.push(seq);
                    seq = fresh(before);
                    continue;
                }
                b')' if nested => {
                    let before = seq.symbols_before;
                    self.pos += 1;
                    if let Some(outer) = open.pop() {
                        seq = outer;
                    }
                    seq.has_item = true;
                    seq.item_rules = (self.symbols() - before).max(1) as u64;
                }
                b'.' => {
                    self.pos += 1;
                    item(&mut seq);
                }
                b'*' | b'+' | b'?' => {
                    let (min, max) = match self.peek() {
                        b'*' => (0, None),
                        b'+' => (1, None),
                        _ => (0, Some(1)),
                    };
                    self.pos += 1;
                    self.space(nested);
                    self.repeat(&mut seq, min, max)?;
                    continue;
                }
                b'{' => {
                    self.pos += 1;
                    self.space(nested);
                    if !self.peek().is_ascii_digit() {
                        return Err(self.error("expecting an integer"));
                    }
                    let min = self.int()?;
                    self.space(nested);
                    let max = match self.peek() {
                        b'}' => Some(min),
                        b',' => {
                            self.pos += 1;
                            self.space(nested);
                            let max =
                                if self.peek().is_ascii_digit() { Some(self.int()?) } else { None };
                            self.space(nested);
                            if self.peek() != b'}' {
                                return Err(self.error("expecting '}'"));
                            }
                            max
                        }
                        _ => return Err(self.error("expecting ',' or '}'")),
                    };
                    self.pos += 1;
                    self.space(nested);
                    self.repeat(&mut seq, min, max)?;
                    continue;
                }
                b'|' => {
                    self.pos += 1;
                    self.space(true);
                    seq = fresh(seq.symbols_before);
                    continue;
                }
                _ if nested => return Err(self.error("expecting ')'")),
                _ => return Ok(()),
            }
            self.space(!open.is_empty());
        }
    }

    /// The whole grammar.
    fn grammar(&mut self) -> Result<(), String> {
        self.space(true);
        while self.peek() != 0 {
            let name = self.name()?;
            self.names.insert(name);
            self.defined.insert(name);
            self.space(false);
            if !self.src[self.pos..].starts_with(b"::=") {
                return Err(self.error("expecting '::='"));
            }
            self.pos += 3;
            self.space(true);
            self.body()?;
            match self.peek() {
                b'\r' => self.pos += if self.at(1) == b'\n' { 2 } else { 1 },
                b'\n' => self.pos += 1,
                0 => {}
                _ => return Err(self.error("expecting the end of the line")),
            }
            self.space(true);
        }
        if let Some(name) = self.names.iter().find(|n| !self.defined.contains(*n)) {
            return Err(format!("undefined rule `{}`", String::from_utf8_lossy(name)));
        }
        Ok(())
    }
}

/// Checks that llama.cpp's parser accepts `text` (start symbol `root`); `single_token`
/// says whether a `<...>` text is exactly one token of the model. The error names the
/// problem and a byte offset, never the grammar's text.
pub(crate) fn check(text: &str, single_token: &dyn Fn(&[u8]) -> bool) -> Result<(), String> {
    if text.contains('\0') {
        return Err("the grammar contains a NUL character".into());
    }
    let mut reader = Reader {
        src: text.as_bytes(),
        pos: 0,
        names: HashSet::new(),
        defined: HashSet::new(),
        synthesized: 0,
        single_token,
    };
    reader.grammar()?;
    if !reader.defined.contains(b"root".as_slice()) {
        return Err("the grammar has no `root` rule".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Result<(), String> {
        check(text, &|t| t == b"<eos>")
    }

    #[test]
    fn accepts_what_llama_cpp_accepts() {
        for g in [
            r#"root ::= "a""#,
            "root ::= \"a\"\n",
            "# comment\nroot ::= x | y # trailing\nx ::= [a-z]+\ny ::= [^\\n\\]-]*\n",
            "root ::= ( \"a\"\n  | \"b\" )?",
            "root ::= \"\\x41\\u00e9\\U0001F600\\t\\\"\"",
            "root ::= [\\[\\]] . <[2]> !<[3]> <eos> !<eos>",
            "root ::= \"a\"{2} \"b\"{1,3} \"c\"{0,} \"d\"{ 2 , 4 }",
            "root ::= \"a\"{0} \"b\"",
            "root ::= (\"a\" | \"b\")*\r\n",
            "root ::= \"x\" (((( \"y\" ))))",
            "root ::= \"é\" [à-ü]",
            "root ::= \"a\"{0,5000}",
            "root ::= \"a\"**",
        ] {
            assert_eq!(ok(g), Ok(()), "{g:?}");
        }
    }

    #[test]
    fn refuses_what_llama_cpp_would_print() {
        for g in [
            "root ::= (",
            "this is not gbnf",
            "root ::= undefined-rule",
            "root ::= \"a",
            "root ::= [a-",
            "root ::= \"\\q\"",
            "root ::= \"\\x4\"",
            "root ::= *",
            "root ::= \"a\"{0}*",
            "root ::= \"a\"{3,1}",
            "root ::= \"a\"{2001}",
            "root ::= \"a\"{99999999999999999999999}",
            "root ::= (\"a\" | \"b\"*){1500}",
            "root ::= \"a\" )",
            "root ::= \"a\"\n| \"b\"",
            "root = \"a\"",
            "root ::= <[99999999999]>",
            "root ::= <[1>",
            "root ::= <nope>",
            "root ::= !\"a\"",
            "root ::= \"a\" ; api_key=sk-proj-abcdefghijklmnop",
            "root_1 ::= \"a\"",
            "start ::= \"a\"",
            "",
        ] {
            assert!(ok(g).is_err(), "{g:?}");
        }
        // The message never quotes the grammar.
        let e = ok("root ::= \"a\" ; password=hunter2").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn deep_nesting_needs_no_stack() {
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(200_000), ")".repeat(200_000));
        assert_eq!(ok(&deep), Ok(()));
    }
}
