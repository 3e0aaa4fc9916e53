//! HTTP/1.1 response encoding: whole responses with `Content-Length`, and streamed ones
//! in chunked transfer encoding (with Server-Sent Events inside the chunks), so the
//! connection stays reusable either way. Everything is appended to a caller's buffer.

use crate::wire::write_u64;

/// The statuses the daemon answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// 200: the request succeeded.
    Ok,
    /// 400: the request is malformed or asks for something we cannot do.
    BadRequest,
    /// 401: a missing or wrong API key.
    Unauthorized,
    /// 404: no such path.
    NotFound,
    /// 405: the path exists, the method does not.
    MethodNotAllowed,
    /// 411: the body has no `Content-Length`.
    LengthRequired,
    /// 413: the body is over the cap.
    PayloadTooLarge,
    /// 417: an `Expect` we cannot meet.
    ExpectationFailed,
    /// 429: the admission queue is full; come back later.
    TooManyRequests,
    /// 431: the head is over the size or header-count limit.
    HeaderFieldsTooLarge,
    /// 500: our fault.
    InternalServerError,
    /// 503: not ready, no usable backend, or draining.
    ServiceUnavailable,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::LengthRequired => 411,
            Status::PayloadTooLarge => 413,
            Status::ExpectationFailed => 417,
            Status::TooManyRequests => 429,
            Status::HeaderFieldsTooLarge => 431,
            Status::InternalServerError => 500,
            Status::ServiceUnavailable => 503,
        }
    }

    /// The reason phrase of the status line.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Unauthorized => "Unauthorized",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::LengthRequired => "Length Required",
            Status::PayloadTooLarge => "Content Too Large",
            Status::ExpectationFailed => "Expectation Failed",
            Status::TooManyRequests => "Too Many Requests",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::InternalServerError => "Internal Server Error",
            Status::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// `Content-Type` of JSON bodies.
pub const JSON: &str = "application/json";
/// `Content-Type` of Server-Sent Events streams.
pub const EVENT_STREAM: &str = "text/event-stream";
/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The interim answer to `Expect: 100-continue`, sent before reading the body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What goes in a response head besides the framing headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    /// The status.
    pub status: Status,
    /// The body's media type.
    pub content_type: &'a str,
    /// The connection closes after this response (`Connection: close` is sent).
    pub close: bool,
    /// Seconds to wait before retrying (`Retry-After`, with 429 and 503).
    pub retry_after: Option<u32>,
    /// Methods the path allows (`Allow`, required with 405).
    pub allow: Option<&'a str>,
}

impl<'a> ResponseHead<'a> {
    /// A head with `status` and `content_type`, keeping the connection open.
    pub fn new(status: Status, content_type: &'a str) -> ResponseHead<'a> {
        ResponseHead { status, content_type, close: false, retry_after: None, allow: None }
    }
}

fn write_head_start(out: &mut Vec<u8>, head: &ResponseHead<'_>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    write_u64(out, head.status.code().into());
    out.push(b' ');
    out.extend_from_slice(head.status.reason().as_bytes());
    out.extend_from_slice(b"\r\nServer: inferd\r\nContent-Type: ");
    out.extend_from_slice(head.content_type.as_bytes());
    out.extend_from_slice(b"\r\n");
    if head.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    if let Some(secs) = head.retry_after {
        out.extend_from_slice(b"Retry-After: ");
        write_u64(out, secs.into());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(allow) = head.allow {
        out.extend_from_slice(b"Allow: ");
        out.extend_from_slice(allow.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends a whole response: head with `Content-Length`, then `body`.
pub fn write_response(out: &mut Vec<u8>, head: &ResponseHead<'_>, body: &[u8]) {
    write_head_start(out, head);
    out.extend_from_slice(b"Content-Length: ");
    write_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Appends the head of a streamed response; chunks follow, then [`write_last_chunk`].
/// Event streams are marked uncacheable.
pub fn write_chunked_head(out: &mut Vec<u8>, head: &ResponseHead<'_>) {
    write_head_start(out, head);
    if head.content_type == EVENT_STREAM {
        out.extend_from_slice(b"Cache-Control: no-cache\r\n");
    }
    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
}

/// Writes `n` in lowercase hex at the end of the first 16 bytes of `buf`; returns them.
fn hex_digits(n: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buf[i..16]
}

fn write_hex(out: &mut Vec<u8>, n: usize) {
    let mut buf = [0u8; 18];
    out.extend_from_slice(hex_digits(n, &mut buf));
}

/// Appends one chunk carrying `data`. Empty data writes nothing: an empty chunk would
/// end the body.
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    write_hex(out, data.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the chunk that ends a streamed body.
pub fn write_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

/// Appends one chunk holding one Server-Sent Event whose data `write_data` appends.
/// The data must hold no line break (compact JSON never does): it becomes a single
/// `data:` line. Written in place, then the chunk size is put in front, so no scratch
/// buffer is needed.
pub fn write_sse_chunk(out: &mut Vec<u8>, write_data: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(b"data: ");
    write_data(out);
    out.extend_from_slice(b"\n\n");
    let len = out.len() - start;
    let mut prefix = [0u8; 18];
    let digits = hex_digits(len, &mut prefix);
    let n = digits.len();
    prefix.copy_within(16 - n..16, 0);
    prefix[n..n + 2].copy_from_slice(b"\r\n");
    out.splice(start..start, prefix[..n + 2].iter().copied());
    out.extend_from_slice(b"\r\n");
}

/// Appends one chunk holding one Server-Sent Event with arbitrary text: each line of
/// `data` becomes its own `data:` line, as the format requires.
pub fn write_sse_event(out: &mut Vec<u8>, data: &str) {
    write_sse_chunk(out, |out| {
        let mut lines = data.split('\n');
        if let Some(first) = lines.next() {
            out.extend_from_slice(first.strip_suffix('\r').unwrap_or(first).as_bytes());
        }
        for line in lines {
            out.extend_from_slice(b"\ndata: ");
            out.extend_from_slice(line.strip_suffix('\r').unwrap_or(line).as_bytes());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    /// Decodes a chunked body strictly; panics on anything malformed. Returns the data
    /// and whether the last chunk was seen.
    fn dechunk(mut b: &[u8]) -> (Vec<u8>, bool) {
        let mut data = Vec::new();
        while !b.is_empty() {
            let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(text(&b[..eol]), 16).unwrap();
            b = &b[eol + 2..];
            if n == 0 {
                assert_eq!(b, b"\r\n");
                return (data, true);
            }
            data.extend_from_slice(&b[..n]);
            assert_eq!(&b[n..n + 2], b"\r\n");
            b = &b[n + 2..];
        }
        (data, false)
    }

    #[test]
    fn whole_response_has_length_and_close() {
        let mut out = Vec::new();
        let mut head = ResponseHead::new(Status::TooManyRequests, JSON);
        head.close = true;
        head.retry_after = Some(3);
        write_response(&mut out, &head, b"{}");
        assert_eq!(
            text(&out),
            "HTTP/1.1 429 Too Many Requests\r\nServer: inferd\r\nContent-Type: application/json\r\n\
             Connection: close\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn every_status_line_parses_back() {
        let all = [
            Status::Ok,
            Status::BadRequest,
            Status::Unauthorized,
            Status::NotFound,
            Status::MethodNotAllowed,
            Status::LengthRequired,
            Status::PayloadTooLarge,
            Status::ExpectationFailed,
            Status::TooManyRequests,
            Status::HeaderFieldsTooLarge,
            Status::InternalServerError,
            Status::ServiceUnavailable,
        ];
        for s in all {
            let mut out = Vec::new();
            let mut head = ResponseHead::new(s, JSON);
            head.allow = Some("GET");
            write_response(&mut out, &head, b"body");
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut resp = httparse::Response::new(&mut headers);
            let n = match resp.parse(&out).unwrap() {
                httparse::Status::Complete(n) => n,
                httparse::Status::Partial => panic!("partial"),
            };
            assert_eq!(resp.code, Some(s.code()));
            assert_eq!(resp.reason, Some(s.reason()));
            let len = resp.headers.iter().find(|h| h.name == "Content-Length").unwrap();
            assert_eq!(len.value, b"4");
            assert!(resp.headers.iter().any(|h| h.name == "Allow" && h.value == b"GET"));
            assert_eq!(&out[n..], b"body");
        }
    }

    #[test]
    fn chunked_stream_round_trips() {
        let mut out = Vec::new();
        write_chunked_head(&mut out, &ResponseHead::new(Status::Ok, EVENT_STREAM));
        let head_end = out.len();
        assert!(
            text(&out).ends_with("Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        );
        assert!(!text(&out).contains("Content-Length"));
        let big = "x".repeat(300);
        write_chunk(&mut out, b"hello ");
        write_chunk(&mut out, b"");
        write_chunk(&mut out, big.as_bytes());
        write_last_chunk(&mut out);
        let (data, ended) = dechunk(&out[head_end..]);
        assert!(ended);
        assert_eq!(data, format!("hello {big}").into_bytes());
        assert!(text(&out[head_end..]).contains("\r\n12c\r\n"));
    }

    #[test]
    fn sse_events_inside_chunks() {
        let mut out = Vec::new();
        write_sse_chunk(&mut out, |o| o.extend_from_slice(b"{\"a\":1}"));
        write_sse_event(&mut out, "one\ntwo\r\nthree");
        write_sse_event(&mut out, "[DONE]");
        write_last_chunk(&mut out);
        let (data, ended) = dechunk(&out);
        assert!(ended);
        assert_eq!(
            text(&data),
            "data: {\"a\":1}\n\ndata: one\ndata: two\ndata: three\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn continue_is_an_interim_response() {
        let mut headers = [httparse::EMPTY_HEADER; 1];
        let mut resp = httparse::Response::new(&mut headers);
        assert_eq!(resp.parse(CONTINUE).unwrap(), httparse::Status::Complete(CONTINUE.len()));
        assert_eq!(resp.code, Some(100));
    }
}
