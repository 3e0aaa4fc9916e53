//! The HTTP connection kind of the daemon: requests read with the core's HTTP reader,
//! chat completions admitted through the same queue, router and breaker as protocol v1,
//! answers written with the OpenAI encoders. One request at a time per connection;
//! after an answer the next (maybe pipelined) request is read.

use super::conn::{Client, Conn, HttpConn, Proto};
use super::{ConnId, DRAINING, Daemon, Gen, Phase, Reply, breaker_outcome};
use crate::activity::Level;
use crate::engine::{Completion, EngineError, EngineErrorKind};
use crate::http::openai::{self, ApiError, CompletionMeta, FinishReason};
use crate::http::request::{Event, Head};
use crate::http::response::{self, JSON, PROMETHEUS_TEXT, ResponseHead, Status};
use crate::http::route::{self, Endpoint};
use crate::router::{BackendId, Outcome};
use crate::wire::{self, ErrorCode};

/// Seconds a client told `queue_full` (429) is asked to wait before retrying.
const RETRY_AFTER_SECS: u32 = 1;

/// Appends a piece of a streamed answer, writing the chunked head and the role event
/// first if this is the first piece.
pub(super) fn write_stream_piece(c: &mut Conn, meta: &CompletionMeta<'_>, piece: &str) {
    start_stream(c, meta);
    if let Some(h) = c.role.http() {
        openai::write_content_chunk_prefixed(&mut c.out, &h.chunk_prefix, piece);
    }
}

fn start_stream(c: &mut Conn, meta: &CompletionMeta<'_>) {
    let Some(h) = c.role.http_mut() else { return };
    if h.streaming {
        return;
    }
    h.streaming = true;
    h.chunk_prefix = openai::content_chunk_prefix(meta);
    let head = ResponseHead {
        close: !h.keep_alive,
        ..ResponseHead::new(Status::Ok, response::EVENT_STREAM)
    };
    response::write_chunked_head(&mut c.out, &head);
    openai::write_role_chunk(&mut c.out, meta);
}

/// Escapes a Prometheus label value.
fn label(out: &mut String, v: &str) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Daemon {
    /// Counts a request's outcome for `/metrics`.
    pub(super) fn count_outcome(&mut self, outcome: &'static str) {
        *self.outcomes.entry(outcome).or_insert(0) += 1;
    }

    /// Takes requests off an HTTP connection while it has none in progress, then asks
    /// for more bytes, or closes when the peer has finished sending.
    pub(super) fn process_http(&mut self, id: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else { return };
            let closing = c.closing;
            let Some(Client { request, proto: Proto::Http(h), .. }) = c.role.client_mut() else {
                return;
            };
            if request.is_some() || closing {
                return;
            }
            match h.reader.poll() {
                None => break,
                Some(Event::Head(head)) => {
                    h.keep_alive = head.keep_alive;
                    h.head_only = head.method == "HEAD";
                    h.streaming = false;
                    if head.expect_continue && h.reader.buffered() < head.content_length {
                        c.out.extend_from_slice(response::CONTINUE);
                        self.queue_flush(id);
                    }
                    // The head is judged once its body is in: a refused request's body
                    // must still be consumed to find the next request.
                    if let Some(h) = self.conns.get_mut(&id).and_then(|c| c.role.http_mut()) {
                        h.pending_head(head);
                    }
                }
                Some(Event::Body(body)) => {
                    let head = h.take_head();
                    match head {
                        Some(head) => self.on_http_request(id, &head, &body),
                        None => {
                            self.http_error(id, &ApiError::invalid(None, "no request head"), None)
                        }
                    }
                }
                Some(Event::Error(e)) => {
                    let rec = self
                        .record(Level::Warn, "request_rejected")
                        .str("transport", "http")
                        .num("status", e.status().code().into())
                        .str("error", &e.to_string());
                    self.log(rec);
                    if let Some(h) = self.conns.get_mut(&id).and_then(|c| c.role.http_mut()) {
                        h.keep_alive = false;
                        h.head_only = false;
                    }
                    self.http_error(id, &ApiError::from_request_error(&e), None);
                    return;
                }
            }
        }
        let Some(c) = self.conns.get(&id) else { return };
        let Some(Client { request, proto: Proto::Http(h), .. }) = c.role.client() else { return };
        if request.is_some() || c.closing {
            return;
        }
        let (partial, wants) = (h.reader.has_partial(), h.reader.wants_bytes());
        self.await_more(id, partial, wants);
    }

    fn on_http_request(&mut self, id: ConnId, head: &Head, body: &[u8]) {
        if let Some(key) = self.cfg.api_key.as_deref() {
            let ok = head.bearer_token().is_some_and(|t| wire::constant_time_eq(t, key.as_bytes()));
            if !ok {
                let rec = self.record(Level::Warn, "http_auth_rejected").str("path", head.route());
                self.log(rec);
                self.count_outcome("unauthorized");
                self.http_error(id, &ApiError::unauthorized(), None);
                return;
            }
        }
        match route::route(head) {
            Err(no) => self.http_error(id, &no.error, no.allow),
            Ok(Endpoint::Health) => {
                let (status, text): (Status, &[u8]) = match self.phase {
                    Phase::Ready => (Status::Ok, br#"{"status":"ready"}"#),
                    Phase::Starting => (Status::ServiceUnavailable, br#"{"status":"loading"}"#),
                    Phase::Draining | Phase::Exited => {
                        (Status::ServiceUnavailable, br#"{"status":"draining"}"#)
                    }
                };
                self.http_respond(id, status, JSON, text, None);
            }
            Ok(Endpoint::Models) => {
                let created = self.wall.unix_ms(self.now) / 1000;
                let models: Vec<(&str, u64)> = self
                    .backends
                    .iter()
                    .filter(|b| b.loaded)
                    .map(|b| (b.name.as_str(), created))
                    .collect();
                let mut out = Vec::new();
                openai::write_models(&mut out, &models);
                self.http_respond(id, Status::Ok, JSON, &out, None);
            }
            Ok(Endpoint::Metrics) => {
                let text = self.metrics_text();
                self.http_respond(id, Status::Ok, PROMETHEUS_TEXT, text.as_bytes(), None);
            }
            Ok(Endpoint::ChatCompletions) => self.on_chat(id, body),
        }
    }

    fn on_chat(&mut self, id: ConnId, body: &[u8]) {
        let req_id = format!("{:x}", self.next_http_id);
        self.next_http_id += 1;
        match self.phase {
            Phase::Ready => {}
            Phase::Starting => {
                self.reject(id, &req_id, ErrorCode::BackendUnavailable, "models are still loading");
                return;
            }
            Phase::Draining | Phase::Exited => {
                self.reject(id, &req_id, ErrorCode::BackendUnavailable, DRAINING);
                self.close_after_flush(id);
                return;
            }
        }
        let chat = match openai::parse_chat_request(body) {
            Ok(chat) => chat,
            Err(e) => {
                self.count_outcome(ErrorCode::InvalidRequest.as_str());
                let rec = self
                    .record(Level::Warn, "request_rejected")
                    .str("req_id", &req_id)
                    .str("transport", "http")
                    .str("code", ErrorCode::InvalidRequest.as_str())
                    .opt_str("param", e.param.as_deref());
                self.log(rec);
                self.http_error(id, &e, None);
                return;
            }
        };
        let created = self.wall.unix_ms(self.now) / 1000;
        let reply = Reply::Http { include_usage: chat.include_usage, created };
        self.admit(id, req_id, chat.stream, reply, chat.params, chat.stop);
    }

    /// Writes a whole answer and moves on to the next request (or closes).
    fn http_respond(
        &mut self,
        id: ConnId,
        status: Status,
        content_type: &str,
        body: &[u8],
        retry_after: Option<u32>,
    ) {
        let draining = self.phase != Phase::Ready && self.phase != Phase::Starting;
        let Some(c) = self.conns.get_mut(&id) else { return };
        let Some(h) = c.role.http() else { return };
        let head = ResponseHead {
            close: !h.keep_alive || draining,
            retry_after,
            ..ResponseHead::new(status, content_type)
        };
        response::write_response(&mut c.out, &head, body);
        if h.head_only {
            // HEAD: the head with the body's Content-Length, without the body.
            c.out.truncate(c.out.len() - body.len());
        }
        self.http_answered(id);
    }

    /// Answers with `error`: a whole error response, or the stream's error event when
    /// the stream has started (its status line is long gone).
    pub(super) fn http_error(&mut self, id: ConnId, error: &ApiError, allow: Option<&'static str>) {
        let draining = self.phase != Phase::Ready && self.phase != Phase::Starting;
        let Some(c) = self.conns.get_mut(&id) else { return };
        let Some(h) = c.role.http() else { return };
        if h.streaming {
            openai::write_stream_error(&mut c.out, error);
        } else {
            let retry_after = (error.status == Status::TooManyRequests).then_some(RETRY_AFTER_SECS);
            let head = ResponseHead {
                close: !h.keep_alive || draining,
                retry_after,
                allow,
                ..ResponseHead::new(error.status, JSON)
            };
            let mark = c.out.len();
            error.write_response(&mut c.out, head);
            if h.head_only {
                // Keep the head (with its Content-Length), drop the body.
                if let Some(end) = c.out[mark..].windows(4).position(|w| w == b"\r\n\r\n") {
                    c.out.truncate(mark + end + 4);
                }
            }
        }
        self.http_answered(id);
    }

    /// The current request is answered: read the next one, or close when the request
    /// did not allow another (or a framing error left the stream unreadable).
    fn http_answered(&mut self, id: ConnId) {
        let draining = self.phase != Phase::Ready && self.phase != Phase::Starting;
        let Some(c) = self.conns.get_mut(&id) else { return };
        let Some(h) = c.role.http_mut() else { return };
        h.streaming = false;
        let keep = h.keep_alive && !draining;
        h.reader.next_request();
        self.queue_flush(id);
        if !keep {
            self.close_after_flush(id);
        }
    }

    /// Ends a chat completion: the answer (or its error), the activity record, the
    /// breaker's verdict, the place released, then the next request.
    pub(super) fn finish_http_gen(
        &mut self,
        g: Gen,
        conn: ConnId,
        start: usize,
        result: Result<Completion, EngineError>,
    ) {
        let now = self.now;
        let backend =
            self.backends.get(g.route.backend.0).map_or("?", |b| b.name.as_str()).to_owned();
        let Reply::Http { include_usage, created } = g.reply else { return };
        let meta = CompletionMeta { id: &g.req_id, created, model: &backend };
        let queued_ms = g.started.millis_since(g.admitted);
        let ttft_ms = g.first_token.unwrap_or(now).millis_since(g.admitted);
        let total_ms = now.millis_since(g.admitted);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if let Some(cl) = c.role.client_mut() {
            cl.request = None;
        }
        let outcome = match result {
            Ok(Completion { usage, stop_reason, prompt_cached_tokens }) => {
                let finish = FinishReason::from_stop_reason(stop_reason, g.stopped)
                    .unwrap_or(FinishReason::Stop);
                if g.stream {
                    if g.content.len() > start {
                        write_stream_piece(c, &meta, &g.content[start..]);
                    }
                    start_stream(c, &meta);
                    openai::write_finish_chunk(&mut c.out, &meta, finish);
                    if include_usage {
                        openai::write_usage_chunk(&mut c.out, &meta, usage);
                    }
                    openai::write_stream_end(&mut c.out);
                } else {
                    let mut body = Vec::with_capacity(256 + g.content.len());
                    openai::write_completion(&mut body, &meta, &g.content, finish, usage);
                    let close =
                        c.role.http().is_none_or(|h| !h.keep_alive) || self.phase != Phase::Ready;
                    let head = ResponseHead { close, ..ResponseHead::new(Status::Ok, JSON) };
                    response::write_response(&mut c.out, &head, &body);
                }
                self.served += 1;
                self.count_outcome("done");
                self.prompt_tokens_total += u64::from(usage.prompt_tokens);
                self.prompt_cached_total += u64::from(prompt_cached_tokens);
                self.completion_tokens_total += u64::from(usage.completion_tokens);
                let rec = self
                    .record(Level::Info, "request_done")
                    .str("req_id", &g.req_id)
                    .str("transport", "http")
                    .str("backend", &backend)
                    .str("stop_reason", stop_reason.as_str())
                    .num("prompt_tokens", usage.prompt_tokens.into())
                    .num("prompt_cached_tokens", prompt_cached_tokens.into())
                    .num("completion_tokens", usage.completion_tokens.into())
                    .num("queued_ms", queued_ms)
                    .num("ttft_ms", ttft_ms)
                    .num("total_ms", total_ms);
                self.log(rec);
                // Moves on to the next request (the stream's end was written above).
                self.http_answered(conn);
                Outcome::Success
            }
            Err(e) => {
                let mid_stream = g.tokens_sent > 0;
                let code = match (mid_stream, e.kind) {
                    (_, EngineErrorKind::InvalidRequest) => ErrorCode::InvalidRequest,
                    (false, EngineErrorKind::Internal) => ErrorCode::Internal,
                    _ => ErrorCode::BackendUnavailable,
                };
                let rec = self
                    .record(
                        Level::Warn,
                        if mid_stream { "request_error_mid_stream" } else { "request_rejected" },
                    )
                    .str("req_id", &g.req_id)
                    .str("transport", "http")
                    .str("backend", &backend)
                    .str("code", code.as_str())
                    .num("completion_tokens", g.tokens_sent.into())
                    .str("error", &e.message);
                self.log(rec);
                self.count_outcome(code.as_str());
                let error = ApiError::from_code(code, format!("backend {backend}: {}", e.message));
                self.http_error(conn, &error, None);
                breaker_outcome(&e)
            }
        };
        self.settle_gen(conn, &g, outcome);
        self.process_lines(conn);
    }

    /// The `/metrics` body in the Prometheus text format.
    fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let s = self.stats();
        let mut out = String::with_capacity(1024);
        out.push_str("# HELP inferd_requests_total Requests by how they ended.\n");
        out.push_str("# TYPE inferd_requests_total counter\n");
        for (outcome, n) in &self.outcomes {
            let _ = writeln!(out, "inferd_requests_total{{outcome=\"{outcome}\"}} {n}");
        }
        let gauges = [
            ("inferd_queued_requests", "Requests waiting for a place.", u64::from(s.queued)),
            ("inferd_active_requests", "Requests generating.", u64::from(s.active)),
            ("inferd_connections", "Open client connections.", u64::from(s.connections)),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let counters = [
            ("inferd_prompt_tokens_total", "Prompt tokens of completed requests.", s.prompt_tokens),
            (
                "inferd_completion_tokens_total",
                "Completion tokens of completed requests.",
                s.completion_tokens,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        self.ttft_hist.write_prometheus(
            &mut out,
            "inferd_time_to_first_token_seconds",
            "From admission to the first token, NDJSON and HTTP.",
        );
        self.duration_hist.write_prometheus(
            &mut out,
            "inferd_request_duration_seconds",
            "From admission to the terminal answer (done or error), NDJSON and HTTP.",
        );
        out.push_str(
            "# HELP inferd_breaker_state Circuit breaker state per backend (1 = current).\n",
        );
        out.push_str("# TYPE inferd_breaker_state gauge\n");
        for (i, b) in self.backends.iter().enumerate() {
            let current = self.router.breaker_state(BackendId(i), self.now).as_str();
            for state in ["closed", "open", "half_open"] {
                out.push_str("inferd_breaker_state{backend=\"");
                label(&mut out, &b.name);
                let v = u8::from(current == state);
                let _ = writeln!(out, "\",state=\"{state}\"}} {v}");
            }
        }
        out
    }
}

impl HttpConn {
    fn pending_head(&mut self, head: Head) {
        self.head = Some(head);
    }

    fn take_head(&mut self) -> Option<Head> {
        self.head.take()
    }
}
