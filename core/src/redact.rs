//! Scrubs secrets from text before it reaches the activity log.
//!
//! A single hand-written pass, no regex: this runs on every activity record, and the
//! profile of an older daemon showed regex redaction as half of its per-request cost.
//! It masks: authorization headers and bearer credentials, `key=value` / `key: value`
//! and JSON `"key":"value"` pairs whose key names a secret, JWTs, and the key shapes of
//! well-known providers (`sk-…`, `xox?-…`, `gh?_…`, `github_pat_…`, `AKIA…`/`ASIA…`,
//! `AIza…`, `glpat-…`).

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

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
}

fn is_cred_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~' | b'+' | b'/' | b'=')
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
        let span = if at_boundary { provider_key(b, i).or_else(|| bearer(b, i)) } else { None }
            .or_else(|| if matches!(b[i], b'=' | b':') { key_value(b, i) } else { None });
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

/// A provider key or JWT starting at `i`: the span to mask.
fn provider_key(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let rest = &b[i..];
    let run = |from: usize, ok: fn(u8) -> bool| {
        from + rest[from..].iter().take_while(|&&c| ok(c)).count()
    };
    let alnum_dash = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let upper_digit = |c: u8| c.is_ascii_uppercase() || c.is_ascii_digit();
    let (prefix_len, end, min) = if rest.starts_with(b"sk-")
        || rest.starts_with(b"sk_live_")
        || rest.starts_with(b"rk_live_")
    {
        let p = if rest[2] == b'-' { 3 } else { 8 };
        (p, run(p, alnum_dash), 16)
    } else if rest.len() > 4
        && rest.starts_with(b"xox")
        && rest[3].is_ascii_alphabetic()
        && rest[4] == b'-'
    {
        (5, run(5, alnum_dash), 10)
    } else if rest.starts_with(b"github_pat_") {
        (11, run(11, alnum_dash), 20)
    } else if rest.len() > 3
        && rest.starts_with(b"gh")
        && b"pousr".contains(&rest[2])
        && rest[3] == b'_'
    {
        (4, run(4, |c| c.is_ascii_alphanumeric()), 20)
    } else if rest.starts_with(b"AKIA") || rest.starts_with(b"ASIA") {
        (4, run(4, upper_digit), 16)
    } else if rest.starts_with(b"AIza") {
        (4, run(4, alnum_dash), 30)
    } else if rest.starts_with(b"glpat-") {
        (6, run(6, alnum_dash), 16)
    } else if rest.starts_with(b"eyJ") {
        return jwt(b, i);
    } else {
        return None;
    };
    (end - prefix_len >= min).then_some((i, i + end))
}

/// `eyJ….eyJ….sig` style tokens: three base64url segments, the first two non-empty.
fn jwt(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'=';
    let mut end = i;
    let mut segments = 0;
    loop {
        let seg_start = end;
        while end < b.len() && b64(b[end]) {
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
    if is_auth {
        // `Authorization: Basic xyz`: mask the scheme's credential too.
        while end < b.len() && b[end].is_ascii_alphabetic() {
            end += 1;
        }
        if end < b.len() && b[end] == b' ' {
            end += 1;
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
    fn authorization_and_bearer() {
        assert_eq!(r("Authorization: Bearer abcdefghijkl"), "Authorization: [REDACTED]");
        assert_eq!(r("authorization=Basic dXNlcjpwYXNz"), "authorization=[REDACTED]");
        assert_eq!(r("send bearer abcdefghijkl now"), "send bearer [REDACTED] now");
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
        ] {
            let at = format!("{prefix}{}", body.repeat(min));
            assert_eq!(r(&format!("k {at} ok")), "k [REDACTED] ok", "{at}");
            let short = format!("{prefix}{}", body.repeat(min - 1));
            assert_eq!(r(&format!("k {short} ok")), format!("k {short} ok"), "{short}");
        }
        // Only at a word boundary ('.', '-', '_' and alphanumerics join words).
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
}
