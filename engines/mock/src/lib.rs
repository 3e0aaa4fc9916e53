//! A scripted, deterministic engine for inferd's tests and benchmarks.
//!
//! By default it echoes the last user message back word by word. A [`MockConfig`] can
//! script the tokens instead, fix how many come out, slow them down, make the load slow
//! or endless, and fail before the stream or after a number of tokens. Nothing in it is
//! random, so a test that drives it sees the same tokens every time.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use inferd_core::engine::{
    CancelFlag, Capabilities, Completion, Engine, EngineError, GenerateRequest, LoadPhase, Role,
    StopReason, Usage, json_type_name,
};
use serde_json::{Map, Value};

/// The longest the engine sleeps without looking at the cancel flag, so a cancel is
/// seen within this much time even with long scripted delays.
const CANCEL_SLICE: Duration = Duration::from_millis(2);

/// What an echo generation cycles through when the last user message has no words but
/// `token_count` asks for tokens anyway.
const FILLER_WORD: &str = "mock";

/// The option keys [`MockConfig::from_options`] understands, for its error message.
const KNOWN_OPTIONS: [&str; 7] =
    ["tokens", "token_count", "mock_tokens", "token_delay_ms", "fail", "load_ms", "never_ready"];

/// How many download progress phases a slow load reports (0 %, 25 %, … 100 %).
const DOWNLOAD_STEPS: u64 = 4;

/// When a generation fails on purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MockFail {
    /// Never fails.
    #[default]
    None,
    /// Fails before the first token.
    Before,
    /// Emits this many tokens, then fails. The failure happens even when the script or
    /// `max_tokens` would have ended the stream sooner: a test asking for a mid-stream
    /// failure gets one.
    After(u32),
}

impl MockFail {
    /// Parses the CLI and config form: `none`, `before` or `after:N`.
    pub fn parse(text: &str) -> Result<MockFail, MockFailError> {
        let text = text.trim();
        match text {
            "none" => Ok(MockFail::None),
            "before" => Ok(MockFail::Before),
            _ => match text.strip_prefix("after:") {
                Some(n) => n
                    .trim()
                    .parse::<u32>()
                    .map(MockFail::After)
                    .map_err(|_| MockFailError::NotACount { text: text.to_owned() }),
                None => Err(MockFailError::Unknown { text: text.to_owned() }),
            },
        }
    }
}

impl FromStr for MockFail {
    type Err = MockFailError;

    fn from_str(text: &str) -> Result<MockFail, MockFailError> {
        MockFail::parse(text)
    }
}

/// Why a `fail` setting is not one of `none`, `before` or `after:N`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MockFailError {
    /// `after:` followed by something other than a whole number.
    #[error("mock fail `{text}`: `after:` takes a whole number of tokens")]
    NotACount {
        /// The setting as given (trimmed).
        text: String,
    },
    /// Neither `none`, `before` nor `after:…`.
    #[error("mock fail `{text}`: expected `none`, `before` or `after:N`")]
    Unknown {
        /// The setting as given (trimmed).
        text: String,
    },
}

/// Why a mock backend's options were refused; each message names the option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A key the mock does not know (a typo must not silently fall back to the echo).
    #[error("unknown mock option `{key}` (known: {known})", known = KNOWN_OPTIONS.join(", "))]
    UnknownOption {
        /// The key as written.
        key: String,
    },
    /// The value has the wrong JSON type, or a value the option cannot take.
    #[error("mock option `{key}`: expected {expected}, got {got}")]
    WrongType {
        /// The option.
        key: String,
        /// What it takes.
        expected: &'static str,
        /// What it was given (a JSON type).
        got: &'static str,
    },
    /// An item of a string list is not a string.
    #[error("mock option `{key}`: expected an array of strings, item {index} is {got}")]
    WrongItemType {
        /// The option.
        key: String,
        /// The item's position, from 0.
        index: usize,
        /// What the item is (a JSON type).
        got: &'static str,
    },
    /// A token count past what the engine counts in.
    #[error("mock option `{key}`: expected a token count below 2^32")]
    CountTooLarge {
        /// The option.
        key: String,
    },
    /// `token_count` and its alias `mock_tokens` were both given, with different values.
    #[error(
        "mock options `{first}` and `{second}` disagree ({first_value} and {second_value}); give one"
    )]
    Disagree {
        /// The spelling seen first.
        first: String,
        /// The spelling seen second.
        second: String,
        /// The first one's value.
        first_value: u32,
        /// The second one's value.
        second_value: u32,
    },
    /// `fail` is a string but not a failure plan.
    #[error(transparent)]
    Fail(#[from] MockFailError),
}

impl fmt::Display for MockFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MockFail::None => f.write_str("none"),
            MockFail::Before => f.write_str("before"),
            MockFail::After(n) => write!(f, "after:{n}"),
        }
    }
}

/// How the mock engine behaves. The default echoes the last user message at full speed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MockConfig {
    /// Tokens to emit instead of the echo, exactly as given (no spaces are added).
    pub tokens: Option<Vec<String>>,
    /// Emit exactly this many tokens (before `max_tokens`), cycling through the echo words
    /// or the scripted list.
    pub token_count: Option<u32>,
    /// Time spent before each token.
    pub token_delay: Duration,
    /// Whether and when generations fail.
    pub fail: MockFail,
    /// Time the load takes, spread over download progress phases.
    pub load_delay: Duration,
    /// The load never finishes, so the backend never becomes ready.
    pub never_ready: bool,
}

impl MockConfig {
    /// Reads a backend's options from the config file.
    ///
    /// Keys: `tokens` (array of strings), `token_count` or its alias `mock_tokens`
    /// (integer), `token_delay_ms` (integer), `fail` (`"none"`, `"before"`, `"after:N"`),
    /// `load_ms` (integer), `never_ready` (bool). `kind` and `name` belong to the
    /// backend entry itself and are skipped; any other key is an error so that a typo
    /// does not silently fall back to the echo.
    pub fn from_options(options: &Map<String, Value>) -> Result<MockConfig, ConfigError> {
        let mut config = MockConfig::default();
        let mut count_key: Option<&str> = None;
        for (key, value) in options {
            match key.as_str() {
                "kind" | "name" => {}
                "tokens" => config.tokens = Some(string_array(key, value)?),
                "token_count" | "mock_tokens" => {
                    let n = u32::try_from(unsigned(key, value)?)
                        .map_err(|_| ConfigError::CountTooLarge { key: key.clone() })?;
                    // Both spellings are accepted; two different answers are a mistake.
                    if let (Some(other), Some(old)) = (count_key, config.token_count)
                        && old != n
                    {
                        return Err(ConfigError::Disagree {
                            first: other.to_owned(),
                            second: key.clone(),
                            first_value: old,
                            second_value: n,
                        });
                    }
                    count_key = Some(key);
                    config.token_count = Some(n);
                }
                "token_delay_ms" => {
                    config.token_delay = Duration::from_millis(unsigned(key, value)?)
                }
                "load_ms" => config.load_delay = Duration::from_millis(unsigned(key, value)?),
                "fail" => {
                    let text = value
                        .as_str()
                        .ok_or_else(|| wrong_type(key, "none, before or after:N", value))?;
                    config.fail = MockFail::parse(text)?;
                }
                "never_ready" => {
                    config.never_ready =
                        value.as_bool().ok_or_else(|| wrong_type(key, "true or false", value))?;
                }
                other => return Err(ConfigError::UnknownOption { key: other.to_owned() }),
            }
        }
        Ok(config)
    }
}

/// The error for `key` holding `value` where it takes `expected`.
fn wrong_type(key: &str, expected: &'static str, value: &Value) -> ConfigError {
    ConfigError::WrongType { key: key.to_owned(), expected, got: json_type_name(value) }
}

/// `key`'s value as a non-negative integer, or an error naming the key.
fn unsigned(key: &str, value: &Value) -> Result<u64, ConfigError> {
    value.as_u64().ok_or_else(|| wrong_type(key, "a non-negative integer", value))
}

/// `key`'s value as an array of strings, or an error naming the key.
fn string_array(key: &str, value: &Value) -> Result<Vec<String>, ConfigError> {
    let items = value.as_array().ok_or_else(|| wrong_type(key, "an array of strings", value))?;
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            item.as_str().map(str::to_owned).ok_or_else(|| ConfigError::WrongItemType {
                key: key.to_owned(),
                index,
                got: json_type_name(item),
            })
        })
        .collect()
}

/// The prompt size the mock reports: whitespace-separated words across all messages,
/// at least 1 so that usage never claims an empty prompt.
pub fn prompt_tokens(request: &GenerateRequest) -> u32 {
    let words: usize = request.messages.iter().map(|m| m.content.split_whitespace().count()).sum();
    u32::try_from(words).unwrap_or(u32::MAX).max(1)
}

/// The echo tokens for a text: its words, each but the first with one leading space, so
/// that the concatenation is the words joined by single spaces.
pub fn echo_tokens(text: &str) -> Vec<String> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, word)| if i == 0 { word.to_owned() } else { format!(" {word}") })
        .collect()
}

/// The scripted, deterministic engine.
#[derive(Clone, Debug, Default)]
pub struct MockEngine {
    config: MockConfig,
}

impl MockEngine {
    /// An engine that behaves as `config` says.
    pub fn new(config: MockConfig) -> MockEngine {
        MockEngine { config }
    }

    /// How this engine behaves.
    pub fn config(&self) -> &MockConfig {
        &self.config
    }

    /// Every token a generation of `request` would emit if nothing stopped it early
    /// (before `max_tokens`, cancellation and scripted failures). Builds the whole list:
    /// meant for tests that want the expected output.
    pub fn planned_tokens(&self, request: &GenerateRequest) -> Vec<String> {
        let plan = self.plan(request);
        (0..plan.len()).filter_map(|i| plan.get(i)).collect()
    }

    fn plan(&self, request: &GenerateRequest) -> Plan {
        let (base, echo) = match &self.config.tokens {
            Some(script) => (script.clone(), false),
            None => {
                let last_user = request
                    .messages
                    .iter()
                    .rev()
                    .find(|m| m.role == Role::User)
                    .map(|m| m.content.as_str())
                    .unwrap_or("");
                (last_user.split_whitespace().map(str::to_owned).collect(), true)
            }
        };
        let cycle_len = self.config.token_count.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        Plan { base, echo, cycle_len }
    }
}

/// Generations of at most this many tokens and no delay run inline on the shell's loop
/// (see `Engine::runs_inline`): they take a few microseconds.
const INLINE_TOKENS: usize = 64;

/// The tokens of one generation, produced one at a time so that a huge `token_count`
/// costs nothing up front.
struct Plan {
    /// Echo words (without spaces) or the scripted tokens.
    base: Vec<String>,
    /// Whether `base` holds echo words, which get the leading-space rule.
    echo: bool,
    /// `token_count`: cycle through `base` to exactly this many tokens.
    cycle_len: Option<usize>,
}

impl Plan {
    fn len(&self) -> usize {
        self.cycle_len.unwrap_or(self.base.len())
    }

    /// Token `i`, or `None` past the end.
    fn get(&self, i: usize) -> Option<String> {
        if i >= self.len() {
            return None;
        }
        let piece = match self.base.len() {
            0 => FILLER_WORD,
            n => self.base[i % n].as_str(),
        };
        // Echo words keep the leading-space rule across a wrap-around, so the text stays
        // words joined by single spaces.
        Some(if self.echo && i > 0 { format!(" {piece}") } else { piece.to_owned() })
    }
}

/// Sleeps for `total`, looking at `cancel` every few milliseconds. Returns `false` when
/// the flag was raised (the sleep is then cut short).
fn sleep_unless_cancelled(total: Duration, cancel: &CancelFlag) -> bool {
    if cancel.is_cancelled() {
        return false;
    }
    if total.is_zero() {
        return true;
    }
    // A deadline rather than summed slices, so oversleeping slices do not add up. A
    // delay too long to represent is slept until cancelled.
    let deadline = Instant::now().checked_add(total);
    loop {
        let left = match deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => CANCEL_SLICE,
        };
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(CANCEL_SLICE));
        if cancel.is_cancelled() {
            return false;
        }
    }
}

impl Engine for MockEngine {
    fn kind(&self) -> &str {
        "mock"
    }

    fn load(&self, progress: &mut dyn FnMut(LoadPhase)) -> Result<Capabilities, EngineError> {
        progress(LoadPhase::CheckingLocal { path: "mock".into() });
        if self.config.never_ready {
            // The shell decides when to give up on a backend; the engine just never answers.
            loop {
                std::thread::park();
            }
        }
        if !self.config.load_delay.is_zero() {
            let step = self.config.load_delay / u32::try_from(DOWNLOAD_STEPS).unwrap_or(1);
            for i in 0..=DOWNLOAD_STEPS {
                if i > 0 {
                    std::thread::sleep(step);
                }
                progress(LoadPhase::Download {
                    downloaded_bytes: i * 100 / DOWNLOAD_STEPS,
                    total_bytes: Some(100),
                    source_url: "mock://model".into(),
                });
            }
        }
        progress(LoadPhase::Mmap { path: "mock".into() });
        progress(LoadPhase::KvCache { n_ctx: 4096 });
        Ok(Capabilities::text_cpu())
    }

    fn runs_inline(&self, request: &GenerateRequest) -> bool {
        let tokens = self.plan(request).len().min(request.max_tokens as usize);
        self.config.token_delay.is_zero() && tokens <= INLINE_TOKENS
    }

    fn generate(
        &self,
        request: &GenerateRequest,
        cancel: &CancelFlag,
        on_token: &mut dyn FnMut(&[u8]),
    ) -> Result<Completion, EngineError> {
        if self.config.fail == MockFail::Before {
            return Err(EngineError::unavailable("mock: scripted failure before the stream"));
        }
        let prompt_tokens = prompt_tokens(request);
        let plan = self.plan(request);
        let limit = usize::try_from(request.max_tokens).unwrap_or(usize::MAX);
        let fail_after = match self.config.fail {
            MockFail::After(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            _ => None,
        };
        let end = |emitted: usize, stop_reason: StopReason| {
            let completion_tokens = u32::try_from(emitted).unwrap_or(u32::MAX);
            Completion::new(Usage { prompt_tokens, completion_tokens }, stop_reason)
        };
        let mut emitted = 0usize;
        loop {
            if cancel.is_cancelled() {
                return Ok(end(emitted, StopReason::Cancelled));
            }
            if fail_after.is_some_and(|n| emitted >= n) {
                return Err(EngineError::unavailable(format!(
                    "mock: scripted failure after {emitted} tokens"
                )));
            }
            let Some(token) = plan.get(emitted) else {
                if let Some(n) = fail_after {
                    // The script ran out before the scripted failure point: fail anyway.
                    return Err(EngineError::unavailable(format!(
                        "mock: scripted failure after {emitted} tokens (script ended before {n})"
                    )));
                }
                // max_tokens 0 is `length` even with nothing to say, as the protocol asks.
                let reason = if limit == 0 { StopReason::Length } else { StopReason::End };
                return Ok(end(emitted, reason));
            };
            if emitted >= limit {
                if fail_after.is_some() {
                    return Err(EngineError::unavailable(format!(
                        "mock: scripted failure after {emitted} tokens (max_tokens reached first)"
                    )));
                }
                return Ok(end(emitted, StopReason::Length));
            }
            if !sleep_unless_cancelled(self.config.token_delay, cancel) {
                return Ok(end(emitted, StopReason::Cancelled));
            }
            on_token(token.as_bytes());
            emitted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferd_core::engine::Message;
    use serde_json::json;

    fn request(messages: &[(Role, &str)], max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            messages: messages
                .iter()
                .map(|(role, content)| Message { role: *role, content: (*content).to_owned() })
                .collect(),
            max_tokens,
            ..GenerateRequest::default()
        }
    }

    fn user(text: &str) -> GenerateRequest {
        request(&[(Role::User, text)], 1000)
    }

    fn run(
        engine: &MockEngine,
        req: &GenerateRequest,
    ) -> (Vec<String>, Result<Completion, EngineError>) {
        run_with(engine, req, &CancelFlag::new())
    }

    fn run_with(
        engine: &MockEngine,
        req: &GenerateRequest,
        cancel: &CancelFlag,
    ) -> (Vec<String>, Result<Completion, EngineError>) {
        let mut tokens = Vec::new();
        let result = engine
            .generate(req, cancel, &mut |b| tokens.push(String::from_utf8(b.to_vec()).unwrap()));
        (tokens, result)
    }

    fn options(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn completion(
        completion_tokens: u32,
        prompt_tokens: u32,
        stop_reason: StopReason,
    ) -> Completion {
        Completion::new(Usage { prompt_tokens, completion_tokens }, stop_reason)
    }

    #[test]
    fn echoes_the_last_user_message_word_by_word() {
        let engine = MockEngine::default();
        assert_eq!(engine.kind(), "mock");
        let req = request(
            &[(Role::System, "be terse"), (Role::User, "first"), (Role::User, "hello  big\tworld")],
            1000,
        );
        let (tokens, result) = run(&engine, &req);
        assert_eq!(tokens, ["hello", " big", " world"]);
        assert_eq!(tokens.concat(), "hello big world");
        assert_eq!(result, Ok(completion(3, 6, StopReason::End)));
    }

    #[test]
    fn echo_skips_assistant_turns_after_the_last_user_message() {
        let req = request(&[(Role::User, "ask this"), (Role::Assistant, "an answer")], 1000);
        let (tokens, _) = run(&MockEngine::default(), &req);
        assert_eq!(tokens, ["ask", " this"]);
    }

    #[test]
    fn empty_last_message_gives_no_tokens_and_prompt_at_least_one() {
        let (tokens, result) = run(&MockEngine::default(), &user("   "));
        assert!(tokens.is_empty());
        assert_eq!(result, Ok(completion(0, 1, StopReason::End)));
    }

    #[test]
    fn max_tokens_cuts_with_length() {
        let engine = MockEngine::default();
        let (tokens, result) = run(&engine, &request(&[(Role::User, "a b c d")], 2));
        assert_eq!(tokens, ["a", " b"]);
        assert_eq!(result, Ok(completion(2, 4, StopReason::Length)));
        // Exactly enough room: the script ends on its own.
        let (tokens, result) = run(&engine, &request(&[(Role::User, "a b")], 2));
        assert_eq!(tokens.len(), 2);
        assert_eq!(result.unwrap().stop_reason, StopReason::End);
    }

    #[test]
    fn max_tokens_zero_is_immediate_length() {
        let engine = MockEngine::default();
        for text in ["a b c", ""] {
            let (tokens, result) = run(&engine, &request(&[(Role::User, text)], 0));
            assert!(tokens.is_empty());
            assert_eq!(result.unwrap().stop_reason, StopReason::Length);
        }
    }

    #[test]
    fn scripted_tokens_are_used_as_given() {
        let engine = MockEngine::new(MockConfig {
            tokens: Some(vec!["Hi".into(), ", ".into(), "there".into()]),
            ..MockConfig::default()
        });
        let (tokens, result) = run(&engine, &user("ignored words here"));
        assert_eq!(tokens, ["Hi", ", ", "there"]);
        assert_eq!(result, Ok(completion(3, 3, StopReason::End)));
    }

    #[test]
    fn token_count_cycles_the_script_or_the_echo() {
        let scripted = MockEngine::new(MockConfig {
            tokens: Some(vec!["x".into(), "y".into()]),
            token_count: Some(5),
            ..MockConfig::default()
        });
        assert_eq!(run(&scripted, &user("q")).0, ["x", "y", "x", "y", "x"]);

        let echo = MockEngine::new(MockConfig { token_count: Some(5), ..MockConfig::default() });
        let (tokens, result) = run(&echo, &user("one two"));
        assert_eq!(tokens, ["one", " two", " one", " two", " one"]);
        assert_eq!(result.unwrap().usage.completion_tokens, 5);

        let shorter = MockEngine::new(MockConfig { token_count: Some(1), ..MockConfig::default() });
        assert_eq!(run(&shorter, &user("one two")).0, ["one"]);

        let none = MockEngine::new(MockConfig { token_count: Some(0), ..MockConfig::default() });
        assert!(run(&none, &user("one two")).0.is_empty());
    }

    #[test]
    fn huge_token_count_costs_nothing_up_front() {
        let engine =
            MockEngine::new(MockConfig { token_count: Some(u32::MAX), ..MockConfig::default() });
        let (tokens, result) = run(&engine, &request(&[(Role::User, "a b")], 3));
        assert_eq!(tokens, ["a", " b", " a"]);
        assert_eq!(result.unwrap().stop_reason, StopReason::Length);
    }

    #[test]
    fn echo_tokens_and_planned_tokens_agree() {
        assert_eq!(echo_tokens("hello big world"), ["hello", " big", " world"]);
        assert!(echo_tokens(" \n ").is_empty());
        let req = user("hello big world");
        assert_eq!(MockEngine::default().planned_tokens(&req), echo_tokens("hello big world"));
    }

    #[test]
    fn token_count_with_nothing_to_cycle_uses_a_filler() {
        let echo = MockEngine::new(MockConfig { token_count: Some(3), ..MockConfig::default() });
        assert_eq!(run(&echo, &user("")).0, ["mock", " mock", " mock"]);
        let scripted = MockEngine::new(MockConfig {
            tokens: Some(Vec::new()),
            token_count: Some(2),
            ..MockConfig::default()
        });
        assert_eq!(run(&scripted, &user("")).0.len(), 2);
    }

    #[test]
    fn fail_before_emits_nothing() {
        let engine =
            MockEngine::new(MockConfig { fail: MockFail::Before, ..MockConfig::default() });
        let (tokens, result) = run(&engine, &user("a b"));
        assert!(tokens.is_empty());
        assert_eq!(
            result,
            Err(EngineError::unavailable("mock: scripted failure before the stream"))
        );
    }

    #[test]
    fn fail_after_n_emits_n_tokens_then_fails() {
        let engine =
            MockEngine::new(MockConfig { fail: MockFail::After(2), ..MockConfig::default() });
        let (tokens, result) = run(&engine, &user("a b c d"));
        assert_eq!(tokens, ["a", " b"]);
        let err = result.unwrap_err();
        assert_eq!(err.kind, inferd_core::engine::EngineErrorKind::Unavailable);
        assert!(err.message.contains("after 2 tokens"), "{}", err.message);

        let zero =
            MockEngine::new(MockConfig { fail: MockFail::After(0), ..MockConfig::default() });
        let (tokens, result) = run(&zero, &user("a b"));
        assert!(tokens.is_empty());
        assert!(result.is_err());
    }

    #[test]
    fn fail_after_still_fails_when_the_stream_would_end_sooner() {
        let engine =
            MockEngine::new(MockConfig { fail: MockFail::After(5), ..MockConfig::default() });
        let (tokens, result) = run(&engine, &user("a b"));
        assert_eq!(tokens.len(), 2);
        assert!(result.is_err());
        let (tokens, result) = run(&engine, &request(&[(Role::User, "a b c d e f")], 1));
        assert_eq!(tokens.len(), 1);
        assert!(result.is_err());
    }

    #[test]
    fn cancel_before_start_returns_cancelled_with_no_tokens() {
        let cancel = CancelFlag::new();
        cancel.cancel();
        let (tokens, result) = run_with(&MockEngine::default(), &user("a b c"), &cancel);
        assert!(tokens.is_empty());
        assert_eq!(result, Ok(completion(0, 3, StopReason::Cancelled)));
    }

    #[test]
    fn cancel_between_tokens_stops_the_stream() {
        let engine = MockEngine::default();
        let cancel = CancelFlag::new();
        let mut tokens = Vec::new();
        let result = engine.generate(&user("a b c d"), &cancel, &mut |b| {
            tokens.push(b.to_vec());
            if tokens.len() == 2 {
                cancel.cancel();
            }
        });
        assert_eq!(tokens.len(), 2);
        assert_eq!(result, Ok(completion(2, 4, StopReason::Cancelled)));
    }

    #[test]
    fn cancel_cuts_a_long_delay_short() {
        // A delay past the end of time: only a cancel seen during the sleep lets this
        // test finish.
        let engine = MockEngine::new(MockConfig {
            token_delay: Duration::from_millis(u64::MAX),
            ..MockConfig::default()
        });
        let cancel = CancelFlag::new();
        let result = std::thread::scope(|s| {
            let worker = s.spawn(|| run_with(&engine, &user("a b"), &cancel));
            cancel.cancel();
            worker.join().unwrap()
        });
        assert!(result.0.is_empty());
        assert_eq!(result.1.unwrap().stop_reason, StopReason::Cancelled);
    }

    #[test]
    fn token_delay_is_spent_per_token() {
        let engine = MockEngine::new(MockConfig {
            token_delay: Duration::from_millis(3),
            ..MockConfig::default()
        });
        let started = Instant::now();
        let (tokens, _) = run(&engine, &user("a b c"));
        assert_eq!(tokens.len(), 3);
        assert!(started.elapsed() >= Duration::from_millis(9));
    }

    #[test]
    fn load_reports_phases_in_order() {
        let mut phases = Vec::new();
        let caps = MockEngine::default().load(&mut |p| phases.push(p)).unwrap();
        assert_eq!(caps, Capabilities::text_cpu());
        assert_eq!(
            phases,
            [
                LoadPhase::CheckingLocal { path: "mock".into() },
                LoadPhase::Mmap { path: "mock".into() },
                LoadPhase::KvCache { n_ctx: 4096 },
            ]
        );
    }

    #[test]
    fn slow_load_reports_download_progress() {
        let engine = MockEngine::new(MockConfig {
            load_delay: Duration::from_millis(4),
            ..MockConfig::default()
        });
        let mut phases = Vec::new();
        let started = Instant::now();
        engine.load(&mut |p| phases.push(p)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(4));
        let downloaded: Vec<u64> = phases
            .iter()
            .filter_map(|p| match p {
                LoadPhase::Download { downloaded_bytes, total_bytes: Some(100), source_url }
                    if source_url == "mock://model" =>
                {
                    Some(*downloaded_bytes)
                }
                _ => None,
            })
            .collect();
        assert_eq!(downloaded, [0, 25, 50, 75, 100]);
        assert_eq!(phases.first(), Some(&LoadPhase::CheckingLocal { path: "mock".into() }));
        assert_eq!(phases.last(), Some(&LoadPhase::KvCache { n_ctx: 4096 }));
    }

    #[test]
    fn never_ready_load_does_not_return() {
        let engine = MockEngine::new(MockConfig { never_ready: true, ..MockConfig::default() });
        let (tx, rx) = std::sync::mpsc::channel();
        // The thread is left parked for the rest of the test process; that is the point.
        std::thread::spawn(move || {
            let result = engine.load(&mut |p| {
                let _ = tx.send(Some(p));
            });
            let _ = tx.send(None);
            drop(result);
        });
        assert_eq!(rx.recv().unwrap(), Some(LoadPhase::CheckingLocal { path: "mock".into() }));
        assert!(rx.recv_timeout(Duration::from_millis(30)).is_err());
    }

    #[test]
    fn fail_parses_and_displays() {
        assert_eq!(MockFail::parse("none"), Ok(MockFail::None));
        assert_eq!(MockFail::parse("before"), Ok(MockFail::Before));
        assert_eq!(MockFail::parse("after:3"), Ok(MockFail::After(3)));
        assert_eq!("after:0".parse::<MockFail>(), Ok(MockFail::After(0)));
        for bad in ["", "later", "after:", "after:x", "after:-1", "Before"] {
            assert!(MockFail::parse(bad).is_err(), "{bad}");
        }
        for f in [MockFail::None, MockFail::Before, MockFail::After(7)] {
            assert_eq!(MockFail::parse(&f.to_string()), Ok(f));
        }
    }

    #[test]
    fn options_set_every_field() {
        let config = MockConfig::from_options(&options(json!({
            "kind": "mock", "name": "m1",
            "tokens": ["a", "b"], "token_count": 4, "token_delay_ms": 5,
            "fail": "after:2", "load_ms": 7, "never_ready": true,
        })))
        .unwrap();
        assert_eq!(
            config,
            MockConfig {
                tokens: Some(vec!["a".into(), "b".into()]),
                token_count: Some(4),
                token_delay: Duration::from_millis(5),
                fail: MockFail::After(2),
                load_delay: Duration::from_millis(7),
                never_ready: true,
            }
        );
        assert_eq!(MockConfig::from_options(&Map::new()), Ok(MockConfig::default()));
        let alias = MockConfig::from_options(&options(json!({"mock_tokens": 9}))).unwrap();
        assert_eq!(alias.token_count, Some(9));
        let both = MockConfig::from_options(&options(json!({"mock_tokens": 9, "token_count": 9})));
        assert_eq!(both.unwrap().token_count, Some(9));
    }

    #[test]
    fn options_errors_name_the_key() {
        let cases = [
            (json!({"speed": 1}), "`speed`"),
            (json!({"tokens": "a b"}), "`tokens`: expected an array of strings"),
            (json!({"tokens": ["a", 1]}), "item 1"),
            (json!({"token_count": -1}), "`token_count`: expected a non-negative integer"),
            (json!({"mock_tokens": 1.5}), "`mock_tokens`"),
            (json!({"token_count": 5_000_000_000u64}), "`token_count`"),
            (json!({"token_delay_ms": "5"}), "`token_delay_ms`"),
            (json!({"load_ms": null}), "`load_ms`"),
            (json!({"fail": true}), "`fail`: expected none, before or after:N, got a boolean"),
            (json!({"fail": "sometimes"}), "sometimes"),
            (json!({"never_ready": 1}), "`never_ready`: expected true or false"),
            (json!({"token_count": 1, "mock_tokens": 2}), "disagree"),
        ];
        for (value, needle) in cases {
            let err = MockConfig::from_options(&options(value.clone())).unwrap_err().to_string();
            assert!(err.contains(needle), "{value}: {err}");
        }
    }

    #[test]
    fn engine_is_usable_as_a_trait_object() {
        let engine: std::sync::Arc<dyn Engine> = std::sync::Arc::new(MockEngine::default());
        let mut out = Vec::new();
        let done =
            engine.generate(&user("x y"), &CancelFlag::new(), &mut |b| out.extend_from_slice(b));
        assert_eq!(out, b"x y");
        assert_eq!(done.unwrap().stop_reason, StopReason::End);
    }
}
