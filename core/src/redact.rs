//! Scrubs secrets from text before it reaches the activity log.
//!
//! A single hand-written pass, no regex: this runs on every activity record, and the
//! profile of an older daemon showed regex redaction as half of its per-request cost.
//! It masks: authorization headers and bearer credentials, `key=value` / `key: value`
//! and JSON `"key":"value"` pairs whose key names a secret, JWTs, the userinfo of URLs
//! with a password (`https://user:pw@host`), the body of PEM private-key blocks, and
//! the key shapes of well-known providers (`sk-…`, `xox?-…`, `gh?_…`, `github_pat_…`,
//! `AKIA…`/`ASIA…`, `AIza…`, `glpat-…`, `hf_…`), also glued to a word before them
//! (`mysk-proj-…`) when their body looks random.
//!
//! The pass stays linear in the text, however hostile: every rule either masks what it
//! scanned (and the pass resumes after it) or gives up after a bounded look.

use std::borrow::Cow;

/// What a masked secret is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Key names (lower case) whose values are secrets, matched as a suffix of the key.
const SECRET_KEYS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "api-key",
    "access_key",
    "secret_key",
    "private_key",
    "credential",
    "credentials",
    "authorization",
    "auth",
    "cookie",
    "session",
];

/// Shortest `sk-` key body with a digit in it that is masked (`sk-abc123de`); without a
/// digit the body needs the provider minimum of 16.
const SK_SHORT_MIN: usize = 8;
/// Shortest body of a key glued to a word before it (`mysk-proj-…`).
const GLUED_MIN: usize = 20;
/// How far into a glued key's body its randomness is judged: a bounded look, so a
/// long run of prefixes costs linear time.
const GLUED_WINDOW: usize = 32;
/// Longest PEM label looked at (`RSA PRIVATE KEY`, `ENCRYPTED PRIVATE KEY`, …).
const PEM_LABEL_MAX: usize = 64;

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
}

fn is_cred_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~' | b'+' | b'/' | b'=')
}

fn alnum_dash(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

fn alnum(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

fn upper_digit(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit()
}

/// Returns `s` with every secret it recognises replaced by [`MASK`].
pub fn redact(s: &str) -> Cow<'_, str> {
    let b = s.as_bytes();
    // Quick exit: every rule needs one of these bytes somewhere.
    if !b.iter().any(|&c| matches!(c, b'=' | b':' | b'-' | b'_' | b'.' | b'A' | b'B' | b'b')) {
        return Cow::Borrowed(s);
    }
    let mut out: Option<String> = None;
    let mut copied = 0; // bytes of `s` already accounted for in `out`
    let mut i = 0;
    while i < b.len() {
        let at_boundary = i == 0 || !is_ident(b[i - 1]);
        let span =
            if at_boundary { provider_key(b, i).or_else(|| bearer(b, i)) } else { glued_key(b, i) }
                .or_else(|| match b[i] {
                    b'=' => key_value(b, i),
                    b':' => url_userinfo(b, i).or_else(|| key_value(b, i)),
                    b'P' => pem_private_key(b, i),
                    _ => None,
                });
        match span {
            Some((start, end)) if end > start => {
                let o = out.get_or_insert_with(|| String::with_capacity(s.len()));
                o.push_str(&s[copied..start]);
                o.push_str(MASK);
                copied = end;
                i = end;
            }
            _ => i += 1,
        }
    }
    match out {
        None => Cow::Borrowed(s),
        Some(mut o) => {
            o.push_str(&s[copied..]);
            Cow::Owned(o)
        }
    }
}

/// A provider's key shape: where its body starts, what the body is made of, and the
/// shortest body masked.
struct Shape {
    prefix_len: usize,
    body: fn(u8) -> bool,
    min: usize,
}

/// The provider shape whose prefix starts `rest`, if any (JWTs are handled apart).
fn shape(rest: &[u8]) -> Option<Shape> {
    let s = |prefix_len, body, min| Some(Shape { prefix_len, body, min });
    if rest.starts_with(b"sk-") {
        s(3, alnum_dash, 16)
    } else if rest.starts_with(b"sk_live_") || rest.starts_with(b"rk_live_") {
        s(8, alnum_dash, 16)
    } else if rest.len() > 4
        && rest.starts_with(b"xox")
        && rest[3].is_ascii_alphabetic()
        && rest[4] == b'-'
    {
        s(5, alnum_dash, 10)
    } else if rest.starts_with(b"github_pat_") {
        s(11, alnum_dash, 20)
    } else if rest.len() > 3
        && rest.starts_with(b"gh")
        && b"pousr".contains(&rest[2])
        && rest[3] == b'_'
    {
        s(4, alnum, 20)
    } else if rest.starts_with(b"hf_") {
        s(3, alnum, 30)
    } else if rest.starts_with(b"AKIA") || rest.starts_with(b"ASIA") {
        s(4, upper_digit, 16)
    } else if rest.starts_with(b"AIza") {
        s(4, alnum_dash, 30)
    } else if rest.starts_with(b"glpat-") {
        s(6, alnum_dash, 16)
    } else {
        None
    }
}

/// A provider key or JWT starting at word boundary `i`: the span to mask. A body that
/// is too short is at most the shape's minimum long, so a miss costs a bounded look.
fn provider_key(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let rest = &b[i..];
    if rest.starts_with(b"eyJ") {
        return jwt(b, i);
    }
    let sh = shape(rest)?;
    let body = &rest[sh.prefix_len..];
    let len = body.iter().take_while(|&&c| (sh.body)(c)).count();
    let short_sk = sh.prefix_len == 3
        && rest[0] == b's'
        && len >= SK_SHORT_MIN
        && body[..len].iter().any(u8::is_ascii_digit);
    (len >= sh.min || short_sk).then_some((i, i + sh.prefix_len + len))
}

/// A provider key glued to the word before it (`mysk-proj-…`, `xghp_…`): masked only
/// when its body is long and looks random (digits and letters, both cases but for the
/// upper-case-only AWS keys), judged within a bounded window.
fn glued_key(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let rest = &b[i..];
    let sh = shape(rest)?;
    let body = &rest[sh.prefix_len..];
    let need = sh.min.max(GLUED_MIN);
    let window = &body[..body.len().min(GLUED_WINDOW.max(need))];
    let in_shape = window.iter().take_while(|&&c| (sh.body)(c)).count();
    if in_shape < need {
        return None;
    }
    let seen = &window[..in_shape];
    let digit = seen.iter().any(u8::is_ascii_digit);
    let upper = seen.iter().any(u8::is_ascii_uppercase);
    let lower = seen.iter().any(u8::is_ascii_lowercase) || rest.starts_with(b"A");
    if !(digit && upper && lower) {
        return None;
    }
    let len = body.iter().take_while(|&&c| (sh.body)(c)).count();
    Some((i, i + sh.prefix_len + len))
}

/// `eyJ….eyJ….sig` style tokens: three base64url segments, the first two non-empty.
/// Unpadded (RFC 7515), so `=` ends a segment: otherwise `eyJ=eyJ=…` would start a
/// scan to the end of the text at every `eyJ`.
fn jwt(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let mut end = i;
    let mut segments = 0;
    loop {
        let seg_start = end;
        while end < b.len() && alnum_dash(b[end]) {
            end += 1;
        }
        if end == seg_start && segments < 2 {
            return None;
        }
        segments += 1;
        if segments == 3 || end >= b.len() || b[end] != b'.' {
            break;
        }
        end += 1;
    }
    (segments == 3 && end - i >= 20).then_some((i, end))
}

/// `scheme://user:password@host` with `:` at `sep`: the whole userinfo (the user part
/// can be a token too, as in `https://<token>:x-oauth-basic@host`). A userinfo without
/// a password is left to the other rules.
fn url_userinfo(b: &[u8], sep: usize) -> Option<(usize, usize)> {
    if !b[sep + 1..].starts_with(b"//") {
        return None;
    }
    let start = sep + 3;
    // The authority ends at the first of these; the next `//` stops it, so the scans
    // of two URLs never overlap.
    let len = b[start..]
        .iter()
        .take_while(|&&c| !matches!(c, b'/' | b'?' | b'#' | b'@' | b'"' | b'\'' | b'<' | b'>'))
        .take_while(|c| !c.is_ascii_whitespace())
        .count();
    let at = start + len;
    if b.get(at) != Some(&b'@') {
        return None;
    }
    let colon = b[start..at].iter().position(|&c| c == b':')?;
    (start + colon + 1 < at).then_some((start, at))
}

/// `-----BEGIN … PRIVATE KEY-----` whose `PRIVATE KEY-----` is at `i`: the block's body
/// up to its `-----END`, or to the end of the text when cut off (a truncated key is
/// still a key). Found from the end of the header, looking back a bounded way for its
/// start: a rule that masked `-----BEGIN` as the value of something before it (as in
/// `Bearer -----BEGIN …`) must not hide the body.
fn pem_private_key(b: &[u8], i: usize) -> Option<(usize, usize)> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const HEADER_END: &[u8] = b"PRIVATE KEY-----";
    const DASHES: &[u8] = b"-----";
    const END: &[u8] = b"-----END ";
    if !b[i..].starts_with(HEADER_END) {
        return None;
    }
    let back = &b[i.saturating_sub(PEM_LABEL_MAX + BEGIN.len())..i];
    let begin = back.windows(BEGIN.len()).rposition(|w| w == BEGIN)?;
    // The same header: no `-----` between its start and here (the `PRIVATE KEY-----`
    // of an `-----END` line looks back at its own block's `-----BEGIN`).
    if back[begin + BEGIN.len()..].windows(DASHES.len()).any(|w| w == DASHES) {
        return None;
    }
    let body = i + HEADER_END.len();
    let end = b[body..].windows(END.len()).position(|w| w == END).map_or(b.len(), |p| body + p);
    Some((body, end))
}

/// `Bearer <credential>` at `i`: the credential's span.
fn bearer(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let rest = &b[i..];
    if rest.len() < 8 || !rest[..6].eq_ignore_ascii_case(b"bearer") || rest[6] != b' ' {
        return None;
    }
    let start = i + 7 + rest[7..].iter().take_while(|&&c| c == b' ').count();
    let end = start + b[start..].iter().take_while(|&&c| is_cred_char(c)).count();
    (end - start >= 8).then_some((start, end))
}

/// A separator (`=` or `:`) at `sep` after a secret key: the value's span.
fn key_value(b: &[u8], sep: usize) -> Option<(usize, usize)> {
    // The key: identifier characters before the separator, maybe inside quotes
    // (`"password":`, `\"password\":`) and followed by spaces.
    let mut k_end = sep;
    while k_end > 0 && b[k_end - 1] == b' ' {
        k_end -= 1;
    }
    while k_end > 0 && matches!(b[k_end - 1], b'"' | b'\'' | b'\\') {
        k_end -= 1;
    }
    let k_start = k_end - b[..k_end].iter().rev().take_while(|&&c| is_key_char(c)).count();
    if k_start == k_end || !is_secret_key(&b[k_start..k_end]) {
        return None;
    }
    let is_auth = b[k_start..k_end].eq_ignore_ascii_case(b"authorization");
    // The value: after spaces, either quoted (to the closing quote) or a bare run.
    let mut v = sep + 1;
    while v < b.len() && b[v] == b' ' {
        v += 1;
    }
    let mut escaped_quote = false;
    if v + 1 < b.len() && b[v] == b'\\' && b[v + 1] == b'"' {
        escaped_quote = true;
        v += 2;
    }
    if v < b.len() && (b[v] == b'"' || b[v] == b'\'') && !escaped_quote {
        let q = b[v];
        let start = v + 1;
        let mut end = start;
        while end < b.len() && b[end] != q {
            end += if b[end] == b'\\' { 2 } else { 1 };
        }
        let end = end.min(b.len());
        return Some((start, end));
    }
    if escaped_quote {
        // JSON text inside a JSON string: the value ends at the next `\"`.
        let start = v;
        let mut end = start;
        while end < b.len() && !(b[end] == b'\\' && b.get(end + 1) == Some(&b'"')) {
            end += 1;
        }
        return Some((start, end));
    }
    let start = v;
    let mut end = start;
    let scheme_word = |w: &[u8]| {
        b.len() > start + w.len()
            && b[start..start + w.len()].eq_ignore_ascii_case(w)
            && b[start + w.len()] == b' '
    };
    if is_auth || scheme_word(b"bearer") || scheme_word(b"basic") {
        // `Authorization: Basic xyz`, `token: Bearer xyz`: mask the scheme's credential
        // too (masking the scheme word alone would skip the credential). A scheme word
        // after the first word goes as well: `Beare Bearer xyz` must not leave `xyz`.
        while end < b.len() && b[end].is_ascii_alphabetic() {
            end += 1;
        }
        if end < b.len() && b[end] == b' ' {
            end += 1;
            while let Some(next) = [&b"bearer "[..], b"basic "]
                .iter()
                .find(|w| b.len() > end + w.len() && b[end..end + w.len()].eq_ignore_ascii_case(w))
            {
                end += next.len();
            }
        } else {
            end = start;
        }
    }
    while end < b.len()
        && !matches!(
            b[end],
            b' ' | b'\t' | b'\n' | b'&' | b',' | b';' | b'"' | b'\'' | b'\\' | b'}' | b')'
        )
    {
        end += 1;
    }
    (end > start).then_some((start, end))
}

fn is_secret_key(key: &[u8]) -> bool {
    SECRET_KEYS.iter().any(|s| {
        key.len() >= s.len() && key[key.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        redact(s).into_owned()
    }

    #[test]
    fn clean_text_is_borrowed() {
        assert!(matches!(redact("request r1 took 5 ms"), Cow::Borrowed(_)));
        assert_eq!(r("max_tokens=5 prompt_tokens: 3"), "max_tokens=5 prompt_tokens: 3");
    }

    #[test]
    fn key_value_pairs() {
        assert_eq!(r("password=hunter2 next"), "password=[REDACTED] next");
        assert_eq!(r("db_password: hunter2"), "db_password: [REDACTED]");
        assert_eq!(r("?api_key=abc123&x=1"), "?api_key=[REDACTED]&x=1");
        assert_eq!(r("SECRET='s3cr3t'"), "SECRET='[REDACTED]'");
        assert_eq!(r("x-api-key: zzz"), "x-api-key: [REDACTED]");
    }

    #[test]
    fn json_pairs() {
        assert_eq!(
            r(r#"{"password":"hunter2","user":"bob"}"#),
            r#"{"password":"[REDACTED]","user":"bob"}"#
        );
        assert_eq!(r(r#"{"access_token" : "a\"b"}"#), r#"{"access_token" : "[REDACTED]"}"#);
        // JSON text already escaped inside a JSON string.
        assert_eq!(r(r#"{\"password\":\"hunter2\"}"#), r#"{\"password\":\"[REDACTED]\"}"#);
    }

    #[test]
    fn every_scheme_word_before_the_credential_goes_too() {
        assert_eq!(r("Authorization: Beare Bearer abcdefgh12345678"), "Authorization: [REDACTED]");
        assert_eq!(r("authorization=Basic Basic dXNlcjpwYXNz x"), "authorization=[REDACTED] x");
        assert_eq!(r("token: Bearer bearer BASIC abc123 x"), "token: [REDACTED] x");
    }

    #[test]
    fn authorization_and_bearer() {
        assert_eq!(r("Authorization: Bearer abcdefghijkl"), "Authorization: [REDACTED]");
        assert_eq!(r("authorization=Basic dXNlcjpwYXNz"), "authorization=[REDACTED]");
        assert_eq!(r("send bearer abcdefghijkl now"), "send bearer [REDACTED] now");
        assert_eq!(r("password: Bearer abcdefgh1234"), "password: [REDACTED]");
        assert_eq!(r("token=basic dXNlcjpwYXNz x"), "token=[REDACTED] x");
    }

    #[test]
    fn provider_shapes() {
        for secret in [
            "sk-proj-abcdefghijklmnopqrstuv",
            "sk-ant-api03-abcdefghijklmnop",
            "xoxb-1234567890-abcdef",
            "ghp_abcdefghijklmnopqrstuvwxyz0123",
            "github_pat_11ABCDEFG0123456789_abcdef",
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAIOSFODNN7EXAMPLE",
            "AIzaSyA1234567890abcdefghijklmnopqrstu",
            "glpat-abcdefghij1234567890",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig-nature_x",
        ] {
            let text = format!("key is {secret} ok");
            assert_eq!(r(&text), "key is [REDACTED] ok", "{secret}");
        }
        // Too short or not at a word boundary: left alone.
        assert_eq!(r("task-sk-12"), "task-sk-12");
        assert_eq!(r("AKIA1"), "AKIA1");
    }

    #[test]
    fn provider_keys_at_their_minimum_length() {
        for (prefix, body, min) in [
            ("sk-", "a", 16),
            ("sk_live_", "a", 16),
            ("rk_live_", "a", 16),
            ("xoxb-", "1", 10),
            ("github_pat_", "a", 20),
            ("ghp_", "a", 20),
            ("gho_", "a", 20),
            ("AKIA", "A", 16),
            ("ASIA", "7", 16),
            ("AIza", "a", 30),
            ("glpat-", "a", 16),
            ("hf_", "a", 30),
            ("sk-", "1", 8),
        ] {
            let at = format!("{prefix}{}", body.repeat(min));
            assert_eq!(r(&format!("k {at} ok")), "k [REDACTED] ok", "{at}");
            let short = format!("{prefix}{}", body.repeat(min - 1));
            assert_eq!(r(&format!("k {short} ok")), format!("k {short} ok"), "{short}");
        }
        // Glued to a word ('.', '-', '_' and alphanumerics join words), a body that does
        // not look random is left alone: see `glued_keys_at_their_limits`.
        for joined in ["tasksk-aaaaaaaaaaaaaaaaaaaa", "a.sk-aaaaaaaaaaaaaaaaaaaa"] {
            assert_eq!(r(joined), joined);
        }
        // Prefixes cut off by the end of the text.
        // (each with a ':' so that the quick exit for clean text does not skip them).
        for cut in ["see: xoxb", "use: gho", "a: xox", "b: gh"] {
            assert_eq!(r(cut), cut);
        }
    }

    #[test]
    fn jwt_shapes() {
        let masked = |s: &str| r(&format!("t {s}")) == "t [REDACTED]";
        assert!(masked("eyJabcdefgh.eyJabcdefgh.sig"));
        // At the end of the text, with an empty signature, exactly 20 bytes.
        assert!(masked("eyJaaaaaaa.eyJaaaaa."));
        assert_eq!("eyJaaaaaaa.eyJaaaaa.".len(), 20);
        assert!(!masked("eyJaaaaaa.eyJaaaaa."), "19 bytes");
        assert!(!masked("eyJabcdefghijklmnopqr..sig"), "empty second segment");
        assert!(!masked("eyJabcdefghijklmnopqrstu"), "one segment");
        assert!(!masked("eyJabcdefghijklmnopq.eyJabc"), "two segments");
    }

    #[test]
    fn bearer_credentials() {
        assert_eq!(r("Bearer   abcdefghij x"), "Bearer   [REDACTED] x");
        assert_eq!(r("bearer abcdefgh"), "bearer [REDACTED]");
        assert_eq!(r("bearer abcdefg"), "bearer abcdefg", "7 characters is not a credential");
    }

    #[test]
    fn key_values_at_the_edges_of_the_text() {
        for same in [
            "=abc",
            " : x",
            "\"=x",
            "password=",
            "password=   ",
            "password=\\",
            r#"password="""#,
            "password=''",
        ] {
            assert_eq!(r(same), same);
        }
        assert_eq!(r("password=a"), "password=[REDACTED]");
        assert_eq!(r("authorization=Basic"), "authorization=[REDACTED]");
        assert_eq!(r("Authorization: Basic "), "Authorization: [REDACTED]");
        assert_eq!(r(r#"password=a"b"#), r#"password=[REDACTED]"b"#);
        assert_eq!(r("password='abc"), "password='[REDACTED]", "unterminated quote");
        assert_eq!(r(r#"{\"password\":\"abc"#), r#"{\"password\":\"[REDACTED]"#);
        // An escaped JSON value ends at the escaped quote, not at another backslash.
        assert_eq!(r(r#"{\"password\":\"a\nb\"}"#), r#"{\"password\":\"[REDACTED]\"}"#);
    }

    #[test]
    fn non_ascii_survives() {
        assert_eq!(r("héllo password=ñañ wörld"), "héllo password=[REDACTED] wörld");
    }

    /// Runs `cases` of (input, expected output) at the start, in the middle and at the
    /// end of a text, and checks that unchanged text is borrowed.
    fn table(cases: &[(&str, &str)]) {
        for &(input, want) in cases {
            for (pre, post) in [("", ""), ("log: ", " done"), ("x ", "")] {
                let text = format!("{pre}{input}{post}");
                let got = redact(&text);
                assert_eq!(got, format!("{pre}{want}{post}"), "in {text:?}");
                assert_eq!(matches!(got, Cow::Borrowed(_)), input == want, "{text:?}");
            }
        }
    }

    #[test]
    fn short_sk_keys_at_their_limits() {
        table(&[
            ("sk-abc123def456", "[REDACTED]"),
            ("sk-abc1234d", "[REDACTED]"), // 8 with a digit: the shortest
            ("sk-abc1234", "sk-abc1234"),  // 7
            ("sk-abcdefgh", "sk-abcdefgh"), // 8 without a digit
            ("sk-abcdefghijklmno", "sk-abcdefghijklmno"), // 15 without a digit
            ("sk-abcdefghijklmnop", "[REDACTED]"), // 16 without a digit
        ]);
    }

    #[test]
    fn hugging_face_tokens_at_their_limits() {
        let at = format!("hf_{}", "aB3".repeat(10));
        let short = format!("hf_{}", "aB3".repeat(10)[..29].to_owned());
        table(&[(&at, "[REDACTED]"), (&short, &short), ("hf_", "hf_"), ("hf_x-y", "hf_x-y")]);
        // The body is alphanumeric: a dash ends it.
        let cut = format!("hf_{}-{}", "a".repeat(29), "b".repeat(10));
        assert_eq!(r(&cut), cut);
    }

    #[test]
    fn glued_keys_at_their_limits() {
        let body20 = "AbC123dEf456GhI789jK"; // 20, digits and both cases
        table(&[
            (&format!("mysk-proj-{body20}"), "my[REDACTED]"),
            (&format!("mysk-{body20}"), "my[REDACTED]"),
            (&format!("mysk-{}", &body20[..19]), &format!("mysk-{}", &body20[..19])),
            ("xghp_AbC123dEf456GhI789jK", "x[REDACTED]"),
            ("keyAKIAIOSFODNN7EXAMPLE1234", "key[REDACTED]"),
            ("keyAKIAIOSFODNN7EXAMPLE123", "keyAKIAIOSFODNN7EXAMPLE123"),
            (&format!("a.hf_{}", "aB3".repeat(10)), "a.[REDACTED]"),
        ]);
        // Glued bodies that do not look random stay (a word ending in "sk" before a dash).
        for same in [
            "task-force-planning-review-2024x", // no upper case
            "task-FORCE-PLANNING-REVIEW-2024X", // no lower case
            "task-Force-Planning-Review-Notes", // no digit
        ] {
            assert_eq!(r(same), same);
        }
        // The randomness is judged in the first 32 bytes of the body only.
        let late = format!("mysk-{}Ab1", "a".repeat(32));
        assert_eq!(r(&late), late);
        let early = format!("mysk-Ab1{}", "a".repeat(32));
        assert_eq!(r(&early), "my[REDACTED]");
    }

    #[test]
    fn url_userinfo_at_its_limits() {
        table(&[
            ("https://user:password@host/x", "https://[REDACTED]@host/x"),
            ("https://u:p@h", "https://[REDACTED]@h"),
            ("https://ghp_token:x-oauth-basic@github.com", "https://[REDACTED]@github.com"),
            ("https://user:@host", "https://user:@host"), // no password
            ("https://user@host", "https://user@host"),   // no password
            ("https://host:8080/a@b", "https://host:8080/a@b"), // '@' after the path
            ("https://user:pass word@host", "https://user:pass word@host"),
            ("mailto:a@b", "mailto:a@b"),
        ]);
        assert_eq!(r("x://a:b@c and y://d:e@f"), "x://[REDACTED]@c and y://[REDACTED]@f");
    }

    #[test]
    fn pem_private_keys_at_their_limits() {
        let block =
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAKCAQ==\n-----END RSA PRIVATE KEY-----";
        table(&[
            (block, "-----BEGIN RSA PRIVATE KEY-----[REDACTED]-----END RSA PRIVATE KEY-----"),
            (
                "-----BEGIN PRIVATE KEY-----x-----END PRIVATE KEY-----",
                "-----BEGIN PRIVATE KEY-----[REDACTED]-----END PRIVATE KEY-----",
            ),
            // Empty body: nothing to mask.
            (
                "-----BEGIN PRIVATE KEY----------END PRIVATE KEY-----",
                "-----BEGIN PRIVATE KEY----------END PRIVATE KEY-----",
            ),
            // Not a private key.
            (
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            ),
            ("-----BEGIN PRIVATE KEY", "-----BEGIN PRIVATE KEY"),
        ]);
        // Cut off: masked to the end of the text (a truncated key is still a key).
        assert_eq!(
            r("x -----BEGIN EC PRIVATE KEY-----\nMHcCAQ and more"),
            "x -----BEGIN EC PRIVATE KEY-----[REDACTED]"
        );
        // The header's start eaten by another rule does not hide the body.
        assert_eq!(
            r("Bearer -----BEGIN RSA PRIVATE KEY-----\nMIIsecret\n-----END RSA PRIVATE KEY-----"),
            "Bearer [REDACTED] RSA PRIVATE KEY-----[REDACTED]-----END RSA PRIVATE KEY-----"
        );
        let long_label = format!("-----BEGIN {} PRIVATE KEY-----x", "A".repeat(PEM_LABEL_MAX));
        assert_eq!(r(&long_label), long_label, "label over the limit");
    }
}
