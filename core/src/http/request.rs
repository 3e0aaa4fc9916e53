//! An incremental HTTP/1.1 request reader for one connection.
//!
//! Bytes go in as the transport delivers them; [`RequestReader::poll`] hands out a
//! parsed head, then the body (by `Content-Length`), then nothing until the caller has
//! answered and calls [`RequestReader::next_request`]. Bytes of pipelined requests stay
//! buffered meanwhile. The end of a head is found by scanning only the bytes not yet
//! scanned, and the head is parsed once (by `httparse`) when it is complete, so a client
//! trickling a head byte by byte costs O(1) per byte. Every limit is checked as bytes
//! arrive, so memory per connection stays bounded by the head and body limits.

use std::fmt;

use super::response::Status;

/// Default cap on a request head (request line and headers), in bytes.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 16 * 1024;
/// Default cap on the number of header fields.
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// The limits a reader enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest head, its final blank line included.
    pub max_head_bytes: usize,
    /// Most header fields in one head.
    pub max_headers: usize,
    /// Largest body (the daemon passes its `max_frame_bytes`).
    pub max_body_bytes: usize,
}

impl Limits {
    /// The default head limits with the given body cap.
    pub fn with_max_body(max_body_bytes: usize) -> Limits {
        Limits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes,
        }
    }
}

/// The HTTP version of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: the connection closes after the answer unless asked to stay.
    Http10,
    /// HTTP/1.1: the connection stays open unless asked to close.
    Http11,
}

/// A parsed request head: what the daemon routes and authorises on.
#[derive(Clone, PartialEq, Eq)]
pub struct Head {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The request target, as sent (origin form, e.g. `/v1/models?x=1`).
    pub path: String,
    /// The protocol version.
    pub version: Version,
    /// Body length; 0 when the request has no `Content-Length`.
    pub content_length: usize,
    /// Whether the connection may carry another request after this one's answer.
    pub keep_alive: bool,
    /// The `Authorization` value, raw. Kept out of `Debug` output: it is a secret.
    pub authorization: Option<Vec<u8>>,
    /// The `Content-Type` value.
    pub content_type: Option<String>,
    /// The client sent `Expect: 100-continue` and waits for an interim answer before
    /// it sends the body.
    pub expect_continue: bool,
}

impl Head {
    /// The path without its query string.
    pub fn route(&self) -> &str {
        self.path.split_once('?').map_or(&self.path, |(p, _)| p)
    }

    /// The token of an `Authorization: Bearer <token>` header, if that is what was sent.
    pub fn bearer_token(&self) -> Option<&[u8]> {
        let v = self.authorization.as_deref()?;
        let (scheme, rest) = v.split_at_checked(7)?;
        // The scheme name is case-insensitive (RFC 9110 §11.1).
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        Some(rest.trim_ascii())
    }
}

impl fmt::Debug for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Head")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("version", &self.version)
            .field("content_length", &self.content_length)
            .field("keep_alive", &self.keep_alive)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("content_type", &self.content_type)
            .field("expect_continue", &self.expect_continue)
            .finish()
    }
}

/// Why a request was refused. Every one is answered with [`RequestError::status`],
/// then the connection closes: after a framing error the reader cannot tell where the
/// next request would start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head is over the size limit.
    #[error("request head exceeds {0} bytes")]
    HeadTooLarge(usize),
    /// The head has more header fields than allowed.
    #[error("request has more than {0} header fields")]
    TooManyHeaders(usize),
    /// `Content-Length` is not a number, or several disagree.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// The body is sent with `Transfer-Encoding` (chunked); a length is required.
    #[error("request bodies must have a Content-Length (Transfer-Encoding is not accepted)")]
    LengthRequired,
    /// The declared body is over the size limit.
    #[error("request body of {length} bytes exceeds {limit} bytes")]
    BodyTooLarge {
        /// The declared length.
        length: u64,
        /// The cap.
        limit: usize,
    },
    /// An `Expect` other than `100-continue`.
    #[error("unsupported expectation")]
    ExpectationFailed,
}

impl RequestError {
    /// The status to answer with.
    pub fn status(&self) -> Status {
        match self {
            RequestError::Malformed(_) | RequestError::BadContentLength => Status::BadRequest,
            RequestError::HeadTooLarge(_) | RequestError::TooManyHeaders(_) => {
                Status::HeaderFieldsTooLarge
            }
            RequestError::LengthRequired => Status::LengthRequired,
            RequestError::BodyTooLarge { .. } => Status::PayloadTooLarge,
            RequestError::ExpectationFailed => Status::ExpectationFailed,
        }
    }
}

/// What [`RequestReader::poll`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A request head, checked against the limits. Its body follows as [`Event::Body`].
    Head(Head),
    /// The whole body of the current request (empty when it has none). The reader now
    /// waits for [`RequestReader::next_request`].
    Body(Vec<u8>),
    /// The request is refused: answer with the error's status and close.
    Error(RequestError),
}

#[derive(Debug)]
enum State {
    /// Waiting for a complete head.
    Head,
    /// Waiting for a body of `length` bytes, starting at `start`.
    Body { length: usize },
    /// The request is out; waiting for the caller to answer it.
    Answering,
    /// A framing error was reported; nothing more comes out.
    Failed,
}

/// The request reader of one connection.
#[derive(Debug)]
pub struct RequestReader {
    buf: Vec<u8>,
    /// Start of the current request's unconsumed bytes.
    start: usize,
    /// Bytes from `start` up to here have been scanned for the end of the head.
    scanned: usize,
    state: State,
    limits: Limits,
}

impl RequestReader {
    /// A reader enforcing `limits`.
    pub fn new(limits: Limits) -> RequestReader {
        RequestReader { buf: Vec::new(), start: 0, scanned: 0, state: State::Head, limits }
    }

    /// Appends bytes read from the transport. The caller reads only while
    /// [`wants_bytes`](Self::wants_bytes), so pipelined bytes stay bounded by one read.
    pub fn push(&mut self, data: &[u8]) {
        if matches!(self.state, State::Failed) {
            return;
        }
        // Drop consumed bytes once they are most of the buffer: amortised O(1) per byte.
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next event, or `None` when more bytes are needed or the current request is
    /// being answered.
    pub fn poll(&mut self) -> Option<Event> {
        match self.state {
            State::Head => self.poll_head(),
            State::Body { length } => {
                if self.buf.len() - self.start < length {
                    return None;
                }
                let body = self.buf[self.start..self.start + length].to_vec();
                self.start += length;
                self.scanned = self.start;
                self.state = State::Answering;
                Some(Event::Body(body))
            }
            State::Answering | State::Failed => None,
        }
    }

    /// The current request has been answered: the next one (maybe already buffered)
    /// may come out. Only meaningful after [`Event::Body`]; the caller closes instead
    /// when the request's head did not allow keep-alive.
    pub fn next_request(&mut self) {
        if matches!(self.state, State::Answering) {
            self.state = State::Head;
        }
    }

    /// Whether the caller should read more bytes: a request is being read, not answered.
    pub fn wants_bytes(&self) -> bool {
        matches!(self.state, State::Head | State::Body { .. })
    }

    /// Whether part of a request has arrived and the rest has not (the read timeout
    /// applies). Blank lines between requests do not count; `poll` skips them, so after
    /// a `poll` the scan below stops at the first byte.
    pub fn has_partial(&self) -> bool {
        match self.state {
            State::Head => self.buf[self.start..].iter().any(|b| !matches!(b, b'\r' | b'\n')),
            State::Body { .. } => true,
            State::Answering | State::Failed => false,
        }
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    fn fail(&mut self, e: RequestError) -> Option<Event> {
        self.state = State::Failed;
        self.buf = Vec::new();
        self.start = 0;
        self.scanned = 0;
        Some(Event::Error(e))
    }

    fn poll_head(&mut self) -> Option<Event> {
        // Blank lines before a request line are skipped (RFC 9112 §2.2); they would
        // otherwise look like the end of an empty head.
        if self.scanned == self.start {
            let blank = self.buf[self.start..].iter().take_while(|b| matches!(b, b'\r' | b'\n'));
            self.start += blank.count();
            self.scanned = self.start;
        }
        let Some(end) = self.find_head_end() else {
            if self.buf.len() - self.start > self.limits.max_head_bytes {
                return self.fail(RequestError::HeadTooLarge(self.limits.max_head_bytes));
            }
            return None;
        };
        if end - self.start > self.limits.max_head_bytes {
            return self.fail(RequestError::HeadTooLarge(self.limits.max_head_bytes));
        }
        let head = match parse_head(&self.buf[self.start..end], &self.limits) {
            Ok(h) => h,
            Err(e) => return self.fail(e),
        };
        self.start = end;
        self.scanned = end;
        self.state = State::Body { length: head.content_length };
        Some(Event::Head(head))
    }

    /// Index just past the blank line ending the head, scanning only new bytes. A bare
    /// LF ends a line too, as `httparse` accepts it.
    fn find_head_end(&mut self) -> Option<usize> {
        let buf = &self.buf;
        for i in self.scanned..buf.len() {
            if buf[i] != b'\n' {
                continue;
            }
            let ends_head = (i > self.start && buf[i - 1] == b'\n')
                || (i > self.start + 1 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n');
            if ends_head {
                self.scanned = i + 1;
                return Some(i + 1);
            }
        }
        self.scanned = buf.len();
        None
    }
}

/// Parses a complete head with `httparse` and checks the fields the daemon relies on.
fn parse_head(bytes: &[u8], limits: &Limits) -> Result<Head, RequestError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(RequestError::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::TooManyHeaders(limits.max_headers));
        }
        Err(e) => return Err(RequestError::Malformed(parse_error_text(e))),
    }
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(RequestError::Malformed("incomplete request line"));
    };
    let version = if minor == 0 { Version::Http10 } else { Version::Http11 };
    let mut content_length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut authorization = None;
    let mut content_type = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Repeated or listed values are fine when they agree (RFC 9112 §6.3).
            for part in h.value.split(|&b| b == b',') {
                let n = parse_length(part.trim_ascii()).ok_or(RequestError::BadContentLength)?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(RequestError::BadContentLength);
                }
                content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::LengthRequired);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(h.value.to_vec());
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(String::from_utf8_lossy(h.value).into_owned());
        } else if name.eq_ignore_ascii_case("expect") {
            if h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(RequestError::ExpectationFailed);
            }
        }
    }
    let length = content_length.unwrap_or(0);
    let content_length = match usize::try_from(length) {
        Ok(n) if n <= limits.max_body_bytes => n,
        _ => return Err(RequestError::BodyTooLarge { length, limit: limits.max_body_bytes }),
    };
    let keep_alive = !close && (version == Version::Http11 || keep_alive_token);
    Ok(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        version,
        content_length,
        keep_alive,
        authorization,
        content_type,
        expect_continue,
    })
}

/// A `Content-Length` value: 1*DIGIT, no sign, no spaces inside; `None` when malformed
/// or beyond u64.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn parse_error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "unsupported HTTP version",
    }
}

#[cfg(test)]
mod tests;
