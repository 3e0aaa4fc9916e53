//! The `openai-compat` backend: relays generations to an OpenAI-compatible server
//! (a cloud API, vLLM, TGI, llama-server, another inferd) over HTTP.
//!
//! Each generation is one streamed `POST {base_url}/v1/chat/completions` made with a
//! blocking client ([`ureq`], rustls with verified certificates, a keep-alive pool) on
//! the engine thread the shell runs it on; at most `max_concurrency` run at once, the
//! others wait inside [`Engine::generate`]. The server-sent events are decoded by the
//! core's sans-IO [`inferd_core::sse`] decoder and turned into tokens by [`Relay`].
//!
//! Failures are classified by [`Failure`]: the ones that say the upstream is unwell
//! (connect, TLS, timeouts, 5xx, 429, a bad or cut stream, a refused key) are
//! `backend_unavailable` and count toward the circuit breaker; the ones that say the
//! request was wrong (400, 404, 422) are `invalid_request` and do not. A `Retry-After`
//! on a 429 or 503 travels to the breaker as [`EngineError::retry_after`].
//!
//! The API key is read from an environment variable whose *name* is configured; the
//! key itself never appears in the config, a log line or an error message.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod relay;

use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use inferd_core::engine::{
    CancelFlag, Capabilities, Completion, Engine, EngineError, GenerateRequest, LoadPhase,
    StopReason, Usage, json_type_name,
};
use inferd_core::redact::redact;
use inferd_core::sse::SseDecoder;
use serde_json::{Map, Value, json};

pub use relay::{Relay, RelayError, StreamEnd};

/// The environment variable the key is read from when `api_key_env` is not set.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";

/// The longest `Retry-After` honoured: an upstream cannot switch a backend off for
/// longer than this with one answer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How often a generation waiting for a concurrency slot looks at its cancel flag.
const SLOT_POLL: Duration = Duration::from_millis(50);

/// The most bytes of an upstream error body quoted back to the client.
const ERROR_QUOTE: usize = 200;

/// The API key, kept out of every `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The backend's settings, from its entry in the config file's `backends` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenAiConfig {
    /// `http://` or `https://` origin (and optional path prefix) of the server, without
    /// the `/v1/chat/completions` suffix.
    pub base_url: String,
    /// The model name sent upstream.
    pub model: String,
    /// The variable the key is read from.
    pub api_key_env: String,
    /// The key, when the variable is set (sent as a bearer token).
    pub api_key: Option<ApiKey>,
    /// Connect, response head and every chunk must come within this.
    pub timeout: Duration,
    /// Requests sent upstream at once.
    pub max_concurrency: u32,
}

/// Why an openai-compat backend's options were refused; each message names the option
/// and none quotes a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A key openai-compat does not know.
    #[error("openai-compat: unknown option `{key}`")]
    UnknownOption {
        /// The key as written.
        key: String,
    },
    /// The value has the wrong JSON type.
    #[error("openai-compat option `{key}`: expected {expected}, got {got}")]
    WrongType {
        /// The option.
        key: String,
        /// What it takes.
        expected: &'static str,
        /// What it was given (a JSON type).
        got: &'static str,
    },
    /// An integer option outside 1..=`max`, or not an integer.
    #[error("openai-compat option `{key}`: expected an integer from 1 to {max}, got {got}")]
    OutOfRange {
        /// The option.
        key: String,
        /// The largest value it takes.
        max: u64,
        /// The number, or the JSON type when it is not one.
        got: String,
    },
    /// A required option is absent.
    #[error("openai-compat option `{key}` is required{hint}", hint = missing_hint(key))]
    Missing {
        /// The option.
        key: &'static str,
    },
    /// `base_url` is not an http(s) URL.
    #[error("openai-compat option `base_url`: expected an http:// or https:// URL, got {url:?}")]
    BadUrl {
        /// The value given, with anything secret-looking redacted.
        url: String,
    },
    /// The key itself was put in the config file.
    #[error(
        "openai-compat option `api_key`: the key does not belong in the config file; put it \
         in an environment variable and name that variable in `api_key_env` (default \
         {default})",
        default = DEFAULT_API_KEY_ENV
    )]
    KeyInConfig,
    /// `api_key_env` names a variable that is not set (or is empty).
    #[error("openai-compat option `api_key_env`: the variable {var} is not set")]
    KeyVarUnset {
        /// The variable's name.
        var: String,
    },
}

/// An example for a missing option, where one helps.
fn missing_hint(key: &str) -> &'static str {
    match key {
        "base_url" => " (e.g. \"https://api.example.com\")",
        _ => "",
    }
}

fn string_opt(key: &str, v: &Value) -> Result<String, ConfigError> {
    v.as_str().map(str::to_owned).ok_or_else(|| ConfigError::WrongType {
        key: key.to_owned(),
        expected: "a string",
        got: json_type_name(v),
    })
}

fn positive(key: &str, v: &Value, max: u64) -> Result<u64, ConfigError> {
    match v.as_u64() {
        Some(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::OutOfRange {
            key: key.to_owned(),
            max,
            got: if v.is_number() { v.to_string() } else { json_type_name(v).to_string() },
        }),
    }
}

impl OpenAiConfig {
    /// Reads the backend's options, looking the key up in the environment with `env`
    /// (the process environment in the daemon, a map in tests).
    pub fn from_options_with(
        options: &Map<String, Value>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<OpenAiConfig, ConfigError> {
        let mut base_url = None;
        let mut model = None;
        let mut api_key_env = None;
        let mut timeout = Duration::from_secs(60);
        let mut max_concurrency = 8;
        for (key, value) in options {
            match key.as_str() {
                "kind" | "name" => {}
                "base_url" => base_url = Some(string_opt(key, value)?),
                "model" => model = Some(string_opt(key, value)?),
                "api_key_env" => api_key_env = Some(string_opt(key, value)?),
                "timeout_secs" => timeout = Duration::from_secs(positive(key, value, 86_400)?),
                "max_concurrency" => {
                    // Bounded by the u32 range; 1024 is already far past any sane upstream.
                    max_concurrency = u32::try_from(positive(key, value, 1024)?).unwrap_or(1024)
                }
                "api_key" => return Err(ConfigError::KeyInConfig),
                other => return Err(ConfigError::UnknownOption { key: other.to_owned() }),
            }
        }
        let base_url = base_url.ok_or(ConfigError::Missing { key: "base_url" })?;
        let base_url = base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || base_url.len() <= "https://".len()
        {
            return Err(ConfigError::BadUrl { url: redact(&base_url).into_owned() });
        }
        let model = model.ok_or(ConfigError::Missing { key: "model" })?;
        let explicit_env = api_key_env.is_some();
        let api_key_env = api_key_env.unwrap_or_else(|| DEFAULT_API_KEY_ENV.to_owned());
        let api_key = env(&api_key_env).filter(|k| !k.is_empty()).map(ApiKey);
        if explicit_env && api_key.is_none() {
            return Err(ConfigError::KeyVarUnset { var: api_key_env });
        }
        Ok(OpenAiConfig { base_url, model, api_key_env, api_key, timeout, max_concurrency })
    }

    /// Reads the backend's options, the key from the process environment.
    pub fn from_options(options: &Map<String, Value>) -> Result<OpenAiConfig, ConfigError> {
        OpenAiConfig::from_options_with(options, |name| std::env::var(name).ok())
    }

    /// Where generations are sent.
    pub fn endpoint(&self) -> String {
        format!("{}/v1/chat/completions", self.base_url)
    }
}

/// How an upstream request failed, and whether that says something about the upstream
/// (counted by the circuit breaker) or about the request (not counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection: refused, reset, unreachable, name not found.
    Connect(String),
    /// The TLS handshake or certificate check failed.
    Tls(String),
    /// Connecting, the response head or the next chunk took longer than `timeout_secs`.
    Timeout,
    /// A 5xx status.
    ServerError(u16),
    /// 429: the upstream is rate limiting us.
    RateLimited,
    /// 401 or 403: the key is missing, wrong or not allowed.
    Unauthorized(u16),
    /// 400, 404 or 422: the upstream refused this request.
    Rejected(u16, String),
    /// Another status the client cannot act on (a redirect, 405, 409, …).
    UnexpectedStatus(u16),
    /// The stream broke the event-stream or completion-chunk format.
    Malformed(String),
    /// The stream ended before the completion did.
    Truncated,
    /// The upstream reported an error inside the stream.
    UpstreamError(String),
}

impl Failure {
    /// Whether the circuit breaker counts it: everything but a refused request.
    pub fn counted(&self) -> bool {
        !matches!(self, Failure::Rejected(..))
    }

    /// The failure as the daemon sees it, with the upstream's `Retry-After` if any.
    pub fn into_engine_error(self, retry_after: Option<Duration>) -> EngineError {
        let message = self.to_string();
        let e = if self.counted() {
            EngineError::unavailable(message)
        } else {
            EngineError::invalid_request(message)
        };
        match retry_after {
            Some(d) if self.counted() => e.with_retry_after(d),
            _ => e,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(why) => write!(f, "cannot reach the upstream: {why}"),
            Failure::Tls(why) => write!(f, "TLS with the upstream failed: {why}"),
            Failure::Timeout => f.write_str("the upstream did not answer in time"),
            Failure::ServerError(s) => write!(f, "the upstream failed (HTTP {s})"),
            Failure::RateLimited => f.write_str("the upstream is rate limiting (HTTP 429)"),
            Failure::Unauthorized(s) => {
                write!(f, "the upstream refused the backend's credentials (HTTP {s})")
            }
            Failure::Rejected(s, why) if why.is_empty() => {
                write!(f, "the upstream rejected the request (HTTP {s})")
            }
            Failure::Rejected(s, why) => {
                write!(f, "the upstream rejected the request (HTTP {s}): {why}")
            }
            Failure::UnexpectedStatus(s) => write!(f, "unexpected upstream status HTTP {s}"),
            Failure::Malformed(why) => write!(f, "malformed upstream stream: {why}"),
            Failure::Truncated => f.write_str("the upstream stream ended before the completion"),
            Failure::UpstreamError(why) => write!(f, "the upstream failed mid-stream: {why}"),
        }
    }
}

/// The failure a status other than 200 means.
pub fn classify_status(status: u16, body: &str) -> Failure {
    match status {
        400 | 404 | 422 => Failure::Rejected(status, quote_error(body)),
        401 | 403 => Failure::Unauthorized(status),
        429 => Failure::RateLimited,
        500..=599 => Failure::ServerError(status),
        _ => Failure::UnexpectedStatus(status),
    }
}

/// The upstream's own words for a refused request, short and redacted: the `message` of
/// an OpenAI error object when there is one, else the start of the body.
fn quote_error(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let text = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.get("message")))
        .and_then(Value::as_str)
        .unwrap_or(body)
        .trim();
    let cut = &text[..text.floor_char_boundary(ERROR_QUOTE)];
    let cut: String = cut.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut out = redact(&cut).into_owned();
    if cut.len() < text.len() {
        out.push('…');
    }
    out
}

/// A `Retry-After` value, in either of its two forms (RFC 9110 §10.2.3): a number of
/// seconds, or an HTTP date, read against the wall clock `now` (a date already past
/// asks for no wait). Capped at [`MAX_RETRY_AFTER`]; anything else is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The JSON body of one streamed chat completion request.
pub fn request_body(model: &str, request: &GenerateRequest) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
        .collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
    });
    if let (Some(seed), Some(obj)) = (request.seed, body.as_object_mut()) {
        obj.insert("seed".into(), json!(seed));
    }
    body
}

/// Counts generations in flight so that at most `max` run at once.
struct Slots {
    busy: Mutex<u32>,
    freed: Condvar,
    max: u32,
}

impl Slots {
    /// Waits for a slot; `None` when `cancel` went up first.
    fn acquire<'a>(&'a self, cancel: &CancelFlag) -> Option<SlotGuard<'a>> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        while *busy >= self.max {
            if cancel.is_cancelled() {
                return None;
            }
            busy =
                self.freed.wait_timeout(busy, SLOT_POLL).unwrap_or_else(PoisonError::into_inner).0;
        }
        *busy += 1;
        Some(SlotGuard(self))
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.0.busy.lock().unwrap_or_else(PoisonError::into_inner);
        *busy = busy.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// The `openai-compat` engine.
pub struct OpenAiEngine {
    config: OpenAiConfig,
    agent: ureq::Agent,
    slots: Slots,
    /// Whether the refused-key message was already printed (once, until a success).
    auth_warned: AtomicBool,
}

impl fmt::Debug for OpenAiEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEngine").field("config", &self.config).finish_non_exhaustive()
    }
}

impl OpenAiEngine {
    /// An engine for `config`; no connection is made until the first generation.
    pub fn new(config: OpenAiConfig) -> Self {
        let t = Some(config.timeout);
        let agent_config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect of a POST to an API is a misconfigured base_url: report its
            // status (counted) instead of following it somewhere the key was not meant for.
            .max_redirects(0)
            .timeout_connect(t)
            .timeout_recv_response(t)
            .timeout_per_read(t)
            .timeout_per_write(t)
            .max_idle_connections_per_host(config.max_concurrency as usize)
            .user_agent(concat!("inferd/", env!("CARGO_PKG_VERSION")))
            .build();
        let slots =
            Slots { busy: Mutex::new(0), freed: Condvar::new(), max: config.max_concurrency };
        OpenAiEngine {
            agent: ureq::Agent::new_with_config(agent_config),
            config,
            slots,
            auth_warned: AtomicBool::new(false),
        }
    }

    /// The settings it was made with.
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    fn fail(&self, failure: Failure, retry_after: Option<Duration>) -> EngineError {
        if let Failure::Unauthorized(status) = failure
            && !self.auth_warned.swap(true, Ordering::Relaxed)
        {
            // Once, not per request: the operator must fix the key; clients meanwhile go
            // to the next backend as the breaker opens.
            eprintln!(
                "inferd: backend openai-compat ({}): the upstream refused the API key (HTTP \
                 {status}); check the environment variable {}",
                redact(&self.config.base_url),
                self.config.api_key_env
            );
        }
        failure.into_engine_error(retry_after)
    }

    fn run(
        &self,
        request: &GenerateRequest,
        cancel: &CancelFlag,
        on_token: &mut dyn FnMut(&[u8]),
    ) -> Result<Completion, EngineError> {
        let body = request_body(&self.config.model, request).to_string();
        let mut req = self
            .agent
            .post(self.config.endpoint())
            .header("content-type", "application/json")
            .header("accept", "text/event-stream");
        if let Some(ApiKey(key)) = &self.config.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let response =
            req.send(body.as_bytes()).map_err(|e| self.fail(transport_failure(&e), None))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
            .filter(|_| matches!(status, 429 | 503));
        let mut reader = response.into_body().into_reader();
        if status != 200 {
            let mut text = Vec::new();
            // Enough of the body to quote its message; the rest is not read.
            let _ = reader.by_ref().take(4096).read_to_end(&mut text);
            let failure = classify_status(status, &String::from_utf8_lossy(&text));
            return Err(self.fail(failure, retry_after));
        }
        let mut relay = Relay::new();
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if cancel.is_cancelled() {
                // Dropping the reader mid-body closes the upstream connection.
                return Ok(Completion::new(relay.usage(), StopReason::Cancelled));
            }
            let n = match reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.fail(read_failure(&e), None)),
            };
            if n == 0 {
                let end = relay
                    .end_of_body(decoder.is_mid_event())
                    .map_err(|e| self.fail(e.into(), None))?;
                return Ok(self.done(end));
            }
            events.clear();
            decoder
                .push(&buf[..n], &mut events)
                .map_err(|e| self.fail(Failure::Malformed(e.to_string()), None))?;
            for event in events.drain(..) {
                match relay.on_event(event, on_token) {
                    Ok(Some(end)) => return Ok(self.done(end)),
                    Ok(None) => {}
                    Err(e) => return Err(self.fail(e.into(), None)),
                }
                if cancel.is_cancelled() {
                    return Ok(Completion::new(relay.usage(), StopReason::Cancelled));
                }
            }
        }
    }

    fn done(&self, end: StreamEnd) -> Completion {
        self.auth_warned.store(false, Ordering::Relaxed);
        Completion::new(end.usage, end.stop_reason)
    }
}

/// The failure a transport error before the response head means.
fn transport_failure(e: &ureq::Error) -> Failure {
    match e {
        ureq::Error::Timeout(_) => Failure::Timeout,
        ureq::Error::Tls(why) => Failure::Tls((*why).to_owned()),
        ureq::Error::Rustls(why) => Failure::Tls(why.to_string()),
        ureq::Error::Io(io) => io_failure(io),
        other => Failure::Connect(redact(&other.to_string()).into_owned()),
    }
}

fn io_failure(e: &std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Connect(redact(&e.to_string()).into_owned()),
    }
}

/// The failure a read error while streaming means: a timeout, or a cut connection.
fn read_failure(e: &std::io::Error) -> Failure {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<ureq::Error>()) {
        Some(ureq::Error::Timeout(_)) => Failure::Timeout,
        Some(ureq::Error::Io(io)) => io_failure(io),
        Some(other) => match other {
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) => transport_failure(other),
            _ => Failure::Truncated,
        },
        None => match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::Timeout,
            _ => Failure::Truncated,
        },
    }
}

impl Engine for OpenAiEngine {
    fn kind(&self) -> &str {
        "openai-compat"
    }

    /// Ready at once: nothing to load, and the upstream's health is the breaker's
    /// business, not a start-up check.
    fn load(&self, _progress: &mut dyn FnMut(LoadPhase)) -> Result<Capabilities, EngineError> {
        Ok(Capabilities {
            accelerator: "remote".into(),
            n_parallel: Some(self.config.max_concurrency),
            ..Capabilities::text_cpu()
        })
    }

    fn parallelism(&self) -> u32 {
        self.config.max_concurrency
    }

    fn generate(
        &self,
        request: &GenerateRequest,
        cancel: &CancelFlag,
        on_token: &mut dyn FnMut(&[u8]),
    ) -> Result<Completion, EngineError> {
        if !request.grammar.is_empty() {
            return Err(EngineError::invalid_request(
                "this backend relays to an OpenAI-compatible server, which takes no GBNF grammar",
            ));
        }
        if request.max_tokens == 0 {
            return Ok(Completion::new(Usage::default(), StopReason::Length));
        }
        let Some(_slot) = self.slots.acquire(cancel) else {
            return Ok(Completion::new(Usage::default(), StopReason::Cancelled));
        };
        self.run(request, cancel, on_token)
    }
}

#[cfg(test)]
mod tests;
