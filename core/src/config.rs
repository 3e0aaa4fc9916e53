//! Configuration: every knob of the spec with its default, read from a JSON file and
//! layered (file, then environment, then flags), validated with errors that name the key.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::framing::DEFAULT_MAX_FRAME_BYTES;
use crate::router::BreakerPolicy;

/// A configuration problem: which key, and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {problem}")]
pub struct ConfigError {
    /// The key (dotted for nested keys, e.g. `backends[1].kind`).
    pub key: String,
    /// What was wrong.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError { key: key.into(), problem: problem.into() }
    }
}

/// The knobs the state machine uses, resolved and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Requests generating at once.
    pub active_permits: u32,
    /// Requests waiting at once.
    pub queue_depth: u32,
    /// Longest frame read or written, in bytes.
    pub max_frame_bytes: usize,
    /// A frame that cannot be written for this long drops the connection; zero disables.
    pub write_timeout: Duration,
    /// A partial request line must complete within this; zero disables.
    pub read_timeout: Duration,
    /// Open inference connections at most; past it new ones are closed at once.
    pub max_connections: u32,
    /// How long in-flight generations may run after a shutdown request.
    pub drain_timeout: Duration,
    /// How often `stats` events go out while something changed.
    pub stats_interval: Duration,
    /// An admin subscriber this many events behind is disconnected.
    pub admin_lag_limit: usize,
    /// Admin subscribers at most; a newcomer past it takes the place of the oldest one
    /// that lags, or is refused when none lags \[ours\].
    pub max_admin_subscribers: usize,
    /// A TCP client must present its key within this, or it is disconnected; zero
    /// disables \[ours\].
    pub auth_timeout: Duration,
    /// The circuit breaker policy.
    pub breaker: BreakerPolicy,
    /// Give up starting when backends are not ready after this long; zero waits forever.
    pub ready_timeout: Duration,
    /// The key TCP clients must present first, if set.
    pub api_key: Option<String>,
    /// Backend names in priority order.
    pub backends: Vec<String>,
    /// Whether `done` frames carry `timings` \[ours\].
    pub timings: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            active_permits: 1,
            queue_depth: 10,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            write_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(60),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(30),
            stats_interval: Duration::from_secs(1),
            admin_lag_limit: 256,
            max_admin_subscribers: 64,
            auth_timeout: Duration::from_secs(10),
            breaker: BreakerPolicy::default(),
            ready_timeout: Duration::from_secs(600),
            api_key: None,
            backends: Vec::new(),
            timings: true,
        }
    }
}

/// One backend of the ordered list: its kind, its name, and its kind's own options.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSpec {
    /// `mock`, `llamacpp` or `openai-compat`.
    pub kind: String,
    /// Unique name; defaults to the kind (with `#2`, `#3` … for repeats).
    pub name: String,
    /// The entry's other keys, for the engine to validate.
    pub options: Map<String, Value>,
}

/// The known backend kinds.
pub const BACKEND_KINDS: &[&str] = &["mock", "llamacpp", "openai-compat"];

/// Settings from one layer (file, environment or flags); `None` means "not set here".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// See [`DaemonConfig::active_permits`].
    pub active_permits: Option<u32>,
    /// See [`DaemonConfig::queue_depth`].
    pub queue_depth: Option<u32>,
    /// See [`DaemonConfig::max_frame_bytes`].
    pub max_frame_bytes: Option<u64>,
    /// Seconds; see [`DaemonConfig::write_timeout`].
    pub write_timeout_secs: Option<u64>,
    /// Seconds; see [`DaemonConfig::read_timeout`].
    pub read_timeout_secs: Option<u64>,
    /// See [`DaemonConfig::max_connections`].
    pub max_connections: Option<u32>,
    /// Seconds; see [`DaemonConfig::drain_timeout`].
    pub drain_timeout_secs: Option<u64>,
    /// Milliseconds; see [`DaemonConfig::stats_interval`].
    pub stats_interval_ms: Option<u64>,
    /// See [`DaemonConfig::admin_lag_limit`].
    pub admin_lag_limit: Option<u64>,
    /// See [`DaemonConfig::max_admin_subscribers`].
    pub max_admin_subscribers: Option<u64>,
    /// Seconds; see [`DaemonConfig::auth_timeout`].
    pub auth_timeout_secs: Option<u64>,
    /// Breaker: failures that open it.
    pub failure_threshold: Option<u32>,
    /// Breaker: seconds failures count for.
    pub failure_window_secs: Option<u64>,
    /// Breaker: seconds it stays open.
    pub cooldown_secs: Option<u64>,
    /// Seconds; see [`DaemonConfig::ready_timeout`].
    pub ready_timeout_secs: Option<u64>,
    /// TCP API key.
    pub api_key: Option<String>,
    /// Runtime directory for sockets and the lock.
    pub runtime_dir: Option<String>,
    /// Inference socket path.
    pub uds: Option<String>,
    /// Admin socket path.
    pub admin_addr: Option<String>,
    /// Lock file path.
    pub lock: Option<String>,
    /// Activity log directory.
    pub log_dir: Option<String>,
    /// Loopback TCP address for inference (off when unset).
    pub tcp: Option<String>,
    /// Loopback TCP address of the OpenAI-compatible HTTP API (off when unset).
    pub http: Option<String>,
    /// Group given access to the inference socket.
    pub group: Option<String>,
    /// The ordered backend list (replaces, never merges).
    pub backends: Option<Vec<BackendSpec>>,
    /// Options applied to every backend of a kind: `(kind, key) -> value`, e.g.
    /// `("llamacpp", "model_path")` from `--model-path`.
    pub backend_overrides: Vec<(String, String, Value)>,
}

/// Top-level keys that override an option of every backend of a kind.
const KIND_OPTIONS: &[(&str, &str)] = &[
    ("model_path", "llamacpp"),
    ("model_sha256", "llamacpp"),
    ("n_ctx", "llamacpp"),
    ("n_parallel", "llamacpp"),
    ("n_gpu_layers", "llamacpp"),
    ("n_threads", "llamacpp"),
    ("mock_tokens", "mock"),
    ("mock_token_delay_ms", "mock"),
    ("mock_fail", "mock"),
    ("mock_load_ms", "mock"),
];

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 { format!("{}…", &s[..s.floor_char_boundary(40)]) } else { s }
}

fn get_u64(key: &str, v: &Value) -> Result<u64, ConfigError> {
    v.as_u64().ok_or_else(|| {
        ConfigError::new(key, format!("expected a non-negative integer, got {}", describe(v)))
    })
}

fn get_u32(key: &str, v: &Value) -> Result<u32, ConfigError> {
    let n = get_u64(key, v)?;
    u32::try_from(n)
        .map_err(|_| ConfigError::new(key, format!("{n} is too large (at most {})", u32::MAX)))
}

fn get_string(key: &str, v: &Value) -> Result<String, ConfigError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| ConfigError::new(key, format!("expected a string, got {}", describe(v))))
}

impl Settings {
    /// Parses a config file's text.
    pub fn from_json(text: &str) -> Result<Settings, ConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::new("(file)", format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(ConfigError::new("(file)", "expected a JSON object at the top level"));
        };
        let mut s = Settings::default();
        for (key, v) in &map {
            s.set(key, v)?;
        }
        Ok(s)
    }

    /// Sets one top-level key from a JSON value (used by the file and by tests).
    pub fn set(&mut self, key: &str, v: &Value) -> Result<(), ConfigError> {
        match key {
            "active_permits" => self.active_permits = Some(get_u32(key, v)?),
            "queue_depth" => self.queue_depth = Some(get_u32(key, v)?),
            "max_frame_bytes" => self.max_frame_bytes = Some(get_u64(key, v)?),
            "write_timeout_secs" => self.write_timeout_secs = Some(get_u64(key, v)?),
            "read_timeout_secs" => self.read_timeout_secs = Some(get_u64(key, v)?),
            "max_connections" => self.max_connections = Some(get_u32(key, v)?),
            "drain_timeout_secs" => self.drain_timeout_secs = Some(get_u64(key, v)?),
            "stats_interval_ms" => self.stats_interval_ms = Some(get_u64(key, v)?),
            "admin_lag_limit" => self.admin_lag_limit = Some(get_u64(key, v)?),
            "max_admin_subscribers" => self.max_admin_subscribers = Some(get_u64(key, v)?),
            "auth_timeout_secs" => self.auth_timeout_secs = Some(get_u64(key, v)?),
            "failure_threshold" => self.failure_threshold = Some(get_u32(key, v)?),
            "failure_window_secs" => self.failure_window_secs = Some(get_u64(key, v)?),
            "cooldown_secs" => self.cooldown_secs = Some(get_u64(key, v)?),
            "ready_timeout_secs" => self.ready_timeout_secs = Some(get_u64(key, v)?),
            "api_key" => self.api_key = Some(get_string(key, v)?),
            "runtime_dir" => self.runtime_dir = Some(get_string(key, v)?),
            "uds" => self.uds = Some(get_string(key, v)?),
            "admin_addr" => self.admin_addr = Some(get_string(key, v)?),
            "lock" => self.lock = Some(get_string(key, v)?),
            "log_dir" => self.log_dir = Some(get_string(key, v)?),
            "tcp" => self.tcp = Some(get_string(key, v)?),
            "http" => self.http = Some(get_string(key, v)?),
            "group" => self.group = Some(get_string(key, v)?),
            "backend" => {
                let kind = get_string(key, v)?;
                self.backends = Some(vec![backend_of_kind(key, &kind)?]);
            }
            "backends" => self.backends = Some(parse_backends(v)?),
            _ => match KIND_OPTIONS.iter().find(|(k, _)| *k == key) {
                Some((k, kind)) => {
                    self.backend_overrides.push(((*kind).into(), option_name(k).into(), v.clone()));
                }
                None => return Err(ConfigError::new(key, "unknown key")),
            },
        }
        Ok(())
    }

    /// Lays `over` on top of `self`: every key `over` sets wins.
    pub fn merge(&mut self, over: Settings) {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            active_permits,
            queue_depth,
            max_frame_bytes,
            write_timeout_secs,
            read_timeout_secs,
            max_connections,
            drain_timeout_secs,
            stats_interval_ms,
            admin_lag_limit,
            max_admin_subscribers,
            auth_timeout_secs,
            failure_threshold,
            failure_window_secs,
            cooldown_secs,
            ready_timeout_secs,
            api_key,
            runtime_dir,
            uds,
            admin_addr,
            lock,
            log_dir,
            tcp,
            http,
            group,
            backends
        );
        self.backend_overrides.extend(over.backend_overrides);
    }

    /// The backend list with the per-kind overrides applied.
    pub fn resolved_backends(&self) -> Vec<BackendSpec> {
        let mut list = self.backends.clone().unwrap_or_default();
        for (kind, key, value) in &self.backend_overrides {
            for b in list.iter_mut().filter(|b| &b.kind == kind) {
                b.options.insert(key.clone(), value.clone());
            }
        }
        list
    }

    /// The state machine's configuration, validated.
    pub fn daemon_config(&self) -> Result<DaemonConfig, ConfigError> {
        let d = DaemonConfig::default();
        let secs =
            |v: Option<u64>, default: Duration| v.map(Duration::from_secs).unwrap_or(default);
        let active_permits = self.active_permits.unwrap_or(d.active_permits);
        if active_permits == 0 {
            return Err(ConfigError::new("active_permits", "must be at least 1"));
        }
        let max_frame_bytes = match self.max_frame_bytes {
            None => d.max_frame_bytes,
            Some(n) if n < 1024 => {
                return Err(ConfigError::new(
                    "max_frame_bytes",
                    format!("{n} is too small (at least 1024)"),
                ));
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let stats_interval = match self.stats_interval_ms {
            None => d.stats_interval,
            Some(0) => return Err(ConfigError::new("stats_interval_ms", "must be at least 1")),
            Some(ms) => Duration::from_millis(ms),
        };
        let failure_threshold = self.failure_threshold.unwrap_or(d.breaker.failure_threshold);
        if failure_threshold == 0 {
            return Err(ConfigError::new("failure_threshold", "must be at least 1"));
        }
        let max_admin_subscribers = match self.max_admin_subscribers {
            None => d.max_admin_subscribers,
            Some(0) => {
                return Err(ConfigError::new("max_admin_subscribers", "must be at least 1"));
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        };
        if self.api_key.as_deref() == Some("") {
            return Err(ConfigError::new(
                "api_key",
                "must not be empty (leave it unset for no key)",
            ));
        }
        Ok(DaemonConfig {
            active_permits,
            queue_depth: self.queue_depth.unwrap_or(d.queue_depth),
            max_frame_bytes,
            write_timeout: secs(self.write_timeout_secs, d.write_timeout),
            read_timeout: secs(self.read_timeout_secs, d.read_timeout),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            drain_timeout: secs(self.drain_timeout_secs, d.drain_timeout),
            stats_interval,
            admin_lag_limit: self
                .admin_lag_limit
                .map_or(d.admin_lag_limit, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            max_admin_subscribers,
            auth_timeout: secs(self.auth_timeout_secs, d.auth_timeout),
            breaker: BreakerPolicy {
                failure_threshold,
                failure_window: secs(self.failure_window_secs, d.breaker.failure_window),
                cooldown: secs(self.cooldown_secs, d.breaker.cooldown),
            },
            ready_timeout: secs(self.ready_timeout_secs, d.ready_timeout),
            api_key: self.api_key.clone(),
            backends: self.resolved_backends().into_iter().map(|b| b.name).collect(),
            timings: true,
        })
    }
}

/// `mock_tokens` → `tokens` for the mock's own option names; llama keys keep theirs.
fn option_name(top_level: &str) -> &str {
    match top_level {
        "mock_tokens" => "token_count",
        "mock_token_delay_ms" => "token_delay_ms",
        "mock_fail" => "fail",
        "mock_load_ms" => "load_ms",
        k => k,
    }
}

/// The name a backend of `kind` gets when none is given: the kind, then `kind#2`,
/// `kind#3` … for repeats among `earlier` (the kinds before it in priority order).
pub fn default_name<'a>(earlier: impl Iterator<Item = &'a str>, kind: &str) -> String {
    match earlier.filter(|k| *k == kind).count() {
        0 => kind.to_owned(),
        same => format!("{kind}#{}", same + 1),
    }
}

fn backend_of_kind(key: &str, kind: &str) -> Result<BackendSpec, ConfigError> {
    if !BACKEND_KINDS.contains(&kind) {
        return Err(ConfigError::new(
            key,
            format!("unknown backend kind {kind:?} (known: {})", BACKEND_KINDS.join(", ")),
        ));
    }
    Ok(BackendSpec { kind: kind.into(), name: kind.into(), options: Map::new() })
}

fn parse_backends(v: &Value) -> Result<Vec<BackendSpec>, ConfigError> {
    let Value::Array(items) = v else {
        return Err(ConfigError::new(
            "backends",
            format!("expected an array of backend objects, got {}", describe(v)),
        ));
    };
    let mut list: Vec<BackendSpec> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("backends[{i}]");
        let Value::Object(obj) = item else {
            return Err(ConfigError::new(
                at,
                format!("expected an object, got {}", describe(item)),
            ));
        };
        let kind = match obj.get("kind") {
            Some(k) => get_string(&format!("{at}.kind"), k)?,
            None => {
                return Err(ConfigError::new(
                    format!("{at}.kind"),
                    "missing (one of: mock, llamacpp)",
                ));
            }
        };
        let mut spec = backend_of_kind(&format!("{at}.kind"), &kind)?;
        spec.name = match obj.get("name") {
            Some(n) => get_string(&format!("{at}.name"), n)?,
            None => default_name(list.iter().map(|b| b.kind.as_str()), &kind),
        };
        if spec.name.is_empty() {
            return Err(ConfigError::new(format!("{at}.name"), "must not be empty"));
        }
        if list.iter().any(|b| b.name == spec.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate backend name {:?}", spec.name),
            ));
        }
        spec.options = obj
            .iter()
            .filter(|(k, _)| *k != "kind" && *k != "name")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        list.push(spec);
    }
    Ok(list)
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let c = Settings::default().daemon_config().unwrap();
        assert_eq!(c.active_permits, 1);
        assert_eq!(c.queue_depth, 10);
        assert_eq!(c.max_frame_bytes, 64 * 1024 * 1024);
        assert_eq!(c.write_timeout, Duration::from_secs(60));
        assert_eq!(c.read_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.stats_interval, Duration::from_secs(1));
        assert_eq!(c.admin_lag_limit, 256);
        assert_eq!(c.breaker, BreakerPolicy::default());
    }

    #[test]
    fn file_values_and_backends() {
        let s = Settings::from_json(
            r#"{"queue_depth":3,"backends":[{"kind":"llamacpp","model_path":"/m.gguf"},{"kind":"mock"},{"kind":"mock","fail":"before"}],
               "n_ctx":512}"#,
        )
        .unwrap();
        let c = s.daemon_config().unwrap();
        assert_eq!(c.queue_depth, 3);
        assert_eq!(c.backends, vec!["llamacpp", "mock", "mock#2"]);
        let b = s.resolved_backends();
        assert_eq!(b[0].options["model_path"], "/m.gguf");
        assert_eq!(b[0].options["n_ctx"], 512);
        assert_eq!(b[2].options["fail"], "before");
        assert!(!b[1].options.contains_key("n_ctx"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Settings::from_json(r#"{"queue_depth":"ten"}"#).unwrap_err();
        assert_eq!(e.key, "queue_depth");
        assert!(e.to_string().contains("expected a non-negative integer"), "{e}");
        let e = Settings::from_json(r#"{"queue_dept":1}"#).unwrap_err();
        assert_eq!(e.to_string(), "config key `queue_dept`: unknown key");
        let e = Settings::from_json(r#"{"backends":[{"kind":"gpt"}]}"#).unwrap_err();
        assert_eq!(e.key, "backends[0].kind");
        let e = Settings::from_json(
            r#"{"backends":[{"kind":"mock","name":"a"},{"kind":"mock","name":"a"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.key, "backends[1].name");
        let e = Settings::from_json("[1]").unwrap_err();
        assert_eq!(e.key, "(file)");
        let e =
            Settings::from_json(r#"{"active_permits":0}"#).unwrap().daemon_config().unwrap_err();
        assert_eq!(e.key, "active_permits");
    }

    #[test]
    fn every_key_reaches_its_setting() {
        let s = Settings::from_json(
            r#"{"active_permits":2,"queue_depth":3,"max_frame_bytes":2048,"write_timeout_secs":4,
                "read_timeout_secs":5,"max_connections":6,"drain_timeout_secs":7,"stats_interval_ms":8,
                "admin_lag_limit":9,"failure_threshold":10,"failure_window_secs":11,"cooldown_secs":12,
                "ready_timeout_secs":13,"api_key":"k","runtime_dir":"/r","uds":"/u","admin_addr":"/a",
                "lock":"/l","log_dir":"/g","tcp":"127.0.0.1:1","http":"127.0.0.1:2","group":"grp",
                "backends":[{"kind":"mock","name":"m","fail":"before"}]}"#,
        )
        .unwrap();
        let c = s.daemon_config().unwrap();
        assert_eq!((c.active_permits, c.queue_depth, c.max_frame_bytes), (2, 3, 2048));
        assert_eq!(c.write_timeout, Duration::from_secs(4));
        assert_eq!(c.read_timeout, Duration::from_secs(5));
        assert_eq!(c.max_connections, 6);
        assert_eq!(c.drain_timeout, Duration::from_secs(7));
        assert_eq!(c.stats_interval, Duration::from_millis(8));
        assert_eq!(c.admin_lag_limit, 9);
        assert_eq!(c.breaker.failure_threshold, 10);
        assert_eq!(c.breaker.failure_window, Duration::from_secs(11));
        assert_eq!(c.breaker.cooldown, Duration::from_secs(12));
        assert_eq!(c.ready_timeout, Duration::from_secs(13));
        assert_eq!(c.api_key.as_deref(), Some("k"));
        assert_eq!(c.backends, vec!["m"]);
        let strings =
            [&s.runtime_dir, &s.uds, &s.admin_addr, &s.lock, &s.log_dir, &s.tcp, &s.http, &s.group];
        let got: Vec<&str> = strings.iter().map(|v| v.as_deref().unwrap_or("")).collect();
        assert_eq!(got, ["/r", "/u", "/a", "/l", "/g", "127.0.0.1:1", "127.0.0.1:2", "grp"]);
        let b = &s.resolved_backends()[0];
        assert_eq!(b.to_string(), "m (mock)");
        assert_eq!(b.options.len(), 1, "kind and name are not options: {:?}", b.options);
    }

    #[test]
    fn frame_cap_has_a_floor_and_values_are_quoted_in_errors() {
        let e = Settings::from_json(r#"{"max_frame_bytes":1023}"#).unwrap().daemon_config();
        assert_eq!(e.unwrap_err().key, "max_frame_bytes");
        let c = Settings::from_json(r#"{"max_frame_bytes":1024}"#).unwrap().daemon_config();
        assert_eq!(c.unwrap().max_frame_bytes, 1024);
        let e = Settings::from_json(r#"{"queue_depth":"abc"}"#).unwrap_err();
        assert!(e.problem.ends_with(r#"got "abc""#), "{e}");
        let long = "x".repeat(100);
        let e = Settings::from_json(&format!(r#"{{"queue_depth":"{long}"}}"#)).unwrap_err();
        assert!(e.problem.ends_with('…') && e.problem.len() < 100, "{e}");
        // Exactly 40 characters (38 and the quotes) is short enough to quote whole.
        let edge = "y".repeat(38);
        let e = Settings::from_json(&format!(r#"{{"queue_depth":"{edge}"}}"#)).unwrap_err();
        assert!(e.problem.ends_with(&format!(r#"got "{edge}""#)), "{e}");
    }

    #[test]
    fn layers_override_in_order() {
        let mut file =
            Settings::from_json(r#"{"queue_depth":3,"active_permits":2,"backend":"mock"}"#)
                .unwrap();
        let env = Settings { queue_depth: Some(5), ..Settings::default() };
        let mut flags = Settings::default();
        flags.set("queue_depth", &Value::from(7)).unwrap();
        flags.set("mock_tokens", &Value::from(4)).unwrap();
        file.merge(env);
        file.merge(flags);
        let c = file.daemon_config().unwrap();
        assert_eq!((c.queue_depth, c.active_permits), (7, 2));
        assert_eq!(file.resolved_backends()[0].options["token_count"], 4);
    }
}
