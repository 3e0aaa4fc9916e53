//! The simulated HTTP clients' side: the daemon's bytes parsed back into HTTP/1.1
//! responses (whole or chunked event streams) and checked against what each request's
//! generation did, under the same invariants as NDJSON answers.

use serde_json::Value;

use super::scripts::Expect;
use super::{GenEnd, Sim, lossy};

/// One response as the client reads it, its body de-chunked.
struct Resp {
    status: u16,
    close: bool,
    chunked: bool,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Takes one whole response off the front of `buf`, or `None` until it is complete.
/// Panics on anything that is not well-formed HTTP/1.1.
fn take_response(c: u64, buf: &mut Vec<u8>) -> Option<Resp> {
    let head_end = find(buf, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end])
        .unwrap_or_else(|_| panic!("c{c}: response head is not UTF-8: {}", lossy(buf)));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|n| n.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("c{c}: bad status line {status_line:?}"));
    let (mut length, mut chunked, mut close) = (None, false, false);
    for line in lines {
        let (k, v) = line.split_once(':').unwrap_or_else(|| panic!("c{c}: bad header {line:?}"));
        let v = v.trim();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(v.parse::<usize>().unwrap_or_else(|_| panic!("c{c}: {line:?}")));
            }
            "transfer-encoding" => {
                assert_eq!(v, "chunked", "c{c}: {line:?}");
                chunked = true;
            }
            "connection" => close = v.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    assert!(
        length.is_some() != chunked,
        "c{c}: a response needs exactly one of Content-Length and chunked: {head:?}"
    );
    let mut at = head_end + 4;
    let mut body = Vec::new();
    if let Some(len) = length {
        if buf.len() < at + len {
            return None;
        }
        body.extend_from_slice(&buf[at..at + len]);
        at += len;
    } else {
        loop {
            let eol = at + find(&buf[at..], b"\r\n")?;
            let size = std::str::from_utf8(&buf[at..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .unwrap_or_else(|| panic!("c{c}: bad chunk size: {}", lossy(&buf[at..eol])));
            let data = eol + 2;
            if buf.len() < data + size + 2 {
                return None;
            }
            assert_eq!(&buf[data + size..data + size + 2], b"\r\n", "c{c}: chunk without CRLF");
            body.extend_from_slice(&buf[data..data + size]);
            at = data + size + 2;
            if size == 0 {
                break;
            }
        }
    }
    buf.drain(..at);
    Some(Resp { status, close, chunked, body })
}

/// The `error` object of an OpenAI error body: its `code` and `message`.
fn error_of(c: u64, v: &Value) -> (String, String) {
    let e = &v["error"];
    let code = e["code"].as_str().unwrap_or_else(|| panic!("c{c}: error without code: {v}"));
    let message =
        e["message"].as_str().unwrap_or_else(|| panic!("c{c}: error without message: {v}"));
    assert!(e["type"].is_string(), "c{c}: error without type: {v}");
    (code.to_owned(), message.to_owned())
}

impl Sim {
    /// Takes bytes the daemon sent on HTTP connection `c`; returns how many answers they
    /// completed (what a flush delivers).
    pub(super) fn on_http_bytes(&mut self, c: u64, bytes: &[u8]) -> u64 {
        let mut buf = {
            let conn = self.conns.get_mut(&c).unwrap_or_else(|| panic!("c{c} vanished"));
            conn.http_buf.extend_from_slice(bytes);
            std::mem::take(&mut conn.http_buf)
        };
        let mut terminals = 0;
        while let Some(resp) = take_response(c, &mut buf) {
            self.check_http_response(c, &resp);
            terminals += 1;
        }
        if let Some(conn) = self.conns.get_mut(&c) {
            conn.http_buf = buf;
        }
        terminals
    }

    fn check_http_response(&mut self, c: u64, resp: &Resp) {
        let conn = self.conns.get_mut(&c).unwrap_or_else(|| panic!("c{c} vanished"));
        assert!(!conn.must_close, "c{c}: an answer after one that closes the connection");
        let Some(exp) = conn.expect.pop_front() else {
            panic!("c{c}: an HTTP answer with no request outstanding: {}", lossy(&resp.body))
        };
        if resp.close {
            conn.must_close = true;
        }
        match exp {
            Expect::HttpMalformed => {
                assert_eq!(resp.status, 400, "c{c}: a malformed head got {}", resp.status);
                assert!(resp.close, "c{c}: a malformed head must close the connection");
                self.cov.http_malformed += 1;
            }
            Expect::HttpOther => {
                assert!(matches!(resp.status, 200 | 503), "c{c}: /health answered {}", resp.status);
            }
            Expect::Request(n) => self.check_http_answer(c, n, resp),
            other => panic!("c{c}: an NDJSON expectation {other:?} on an HTTP connection"),
        }
    }

    fn check_http_answer(&mut self, c: u64, n: usize, resp: &Resp) {
        let spec = &self.specs[n];
        let want_id = format!("chatcmpl-{}", spec.id);
        if !resp.chunked {
            let v: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
                panic!("c{c}: answer to request {n} is not JSON ({e}): {}", lossy(&resp.body))
            });
            if resp.status != 200 {
                let (code, message) = error_of(c, &v);
                self.cov.http_errors += 1;
                self.check_request_error(c, n, &code, &message);
                return;
            }
            assert!(!spec.stream, "c{c}: a whole answer to streamed request {n}");
            assert_eq!(v["object"], "chat.completion", "c{c}: {v}");
            assert_eq!(v["id"].as_str(), Some(want_id.as_str()), "c{c}: completion id: {v}");
            let content = v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| {
                panic!("c{c}: completion without content: {v}");
            });
            let finish = v["choices"][0]["finish_reason"].as_str().unwrap_or("").to_owned();
            self.check_http_done(c, n, content, &finish, Some(&v["usage"]), &v["model"]);
            return;
        }
        assert_eq!(resp.status, 200, "c{c}: a chunked answer that is not 200");
        assert!(spec.stream, "c{c}: an event stream for stream:false request {n}");
        let body = std::str::from_utf8(&resp.body)
            .unwrap_or_else(|_| panic!("c{c}: event stream is not UTF-8"));
        let events: Vec<&str> = body
            .split_terminator("\n\n")
            .map(|e| {
                e.strip_prefix("data: ").unwrap_or_else(|| panic!("c{c}: not a data event: {e:?}"))
            })
            .collect();
        let mut text = String::new();
        let mut finish = None;
        let mut usage = None;
        let mut model = Value::Null;
        for (i, e) in events.iter().enumerate() {
            let last = i + 1 == events.len();
            if *e == "[DONE]" {
                assert!(last, "c{c}: events after [DONE]");
                let finish: String =
                    finish.unwrap_or_else(|| panic!("c{c}: a stream without a finish"));
                self.check_http_done(c, n, &text, &finish, usage.as_ref(), &model);
                return;
            }
            let v: Value = serde_json::from_str(e)
                .unwrap_or_else(|err| panic!("c{c}: event is not JSON ({err}): {e}"));
            if v.get("error").is_some() {
                assert!(last, "c{c}: events after an error event");
                let (code, message) = error_of(c, &v);
                self.cov.http_errors += 1;
                self.check_request_error(c, n, &code, &message);
                return;
            }
            assert_eq!(v["object"], "chat.completion.chunk", "c{c}: {e}");
            assert_eq!(v["id"].as_str(), Some(want_id.as_str()), "c{c}: chunk id: {e}");
            model = v["model"].clone();
            if let Some(u) = v.get("usage") {
                assert!(finish.is_some(), "c{c}: usage before the finish: {e}");
                usage = Some(u.clone());
                continue;
            }
            assert!(finish.is_none(), "c{c}: a delta after the finish: {e}");
            let choice = &v["choices"][0];
            if i == 0 {
                assert_eq!(choice["delta"]["role"], "assistant", "c{c}: first event: {e}");
            } else if let Some(t) = choice["delta"]["content"].as_str() {
                assert!(!t.is_empty(), "c{c}: an empty content delta");
                text.push_str(t);
                self.cov.tokens += 1;
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_owned());
            }
        }
        panic!("c{c}: the stream of request {n} ended with neither [DONE] nor an error");
    }

    /// A successful answer: the text is the engine's, the finish its stop reason.
    fn check_http_done(
        &mut self,
        c: u64,
        n: usize,
        content: &str,
        finish: &str,
        usage: Option<&Value>,
        model: &Value,
    ) {
        let g = self.reqs[n]
            .generation
            .unwrap_or_else(|| panic!("c{c}: a completion for request {n} never started"));
        let gen_ = &self.gens[&g];
        let Some(GenEnd::Done(comp)) = &gen_.end else {
            panic!("c{c}: a completion for g{g} whose engine did not report done")
        };
        assert_eq!(
            content,
            String::from_utf8_lossy(&gen_.bytes),
            "c{c}: the completion differs from the engine's bytes"
        );
        let want = match comp.stop_reason {
            inferd_core::wire::StopReason::Length => "length",
            _ => "stop",
        };
        assert_eq!(finish, want, "c{c}: finish_reason for {:?}", comp.stop_reason);
        assert_eq!(
            model.as_str(),
            Some(self.backends[gen_.backend.0].name.as_str()),
            "c{c}: model"
        );
        if let Some(u) = usage {
            assert_eq!(u["prompt_tokens"], comp.usage.prompt_tokens, "c{c}: usage");
            assert_eq!(u["completion_tokens"], comp.usage.completion_tokens, "c{c}: usage");
        }
        self.reqs[n].terminal = true;
        self.cov.done += 1;
        self.cov.http_done += 1;
    }
}
