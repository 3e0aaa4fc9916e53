//! What both inferd shells share above the core: the `serve` command line (flags and
//! `INFERD_*` variables), layering it over the config file, the engine registry, and
//! the start-up steps that come before the event loop (lock, runtime directory, admin
//! socket, activity log).

use std::path::PathBuf;
use std::sync::Arc;

use inferd_core::activity::{Level, Record};
use inferd_core::engine::Engine;
use inferd_core::{BackendSpec, ConfigError, DaemonConfig, Settings};
#[cfg(feature = "llama")]
use inferd_engine_llama::{LlamaConfig, LlamaEngine};
use inferd_engine_mock::{MockConfig, MockEngine};
use inferd_engine_openai_compat::{OpenAiConfig, OpenAiEngine};
use inferd_host::driver::ServeSetup;
use inferd_host::lock::InstanceLock;
use inferd_host::logfile::ActivityLogFile;
use inferd_host::{fdlimit, paths, socket, time};
use serde_json::Value;

/// The flags of `serve`, each also settable by an `INFERD_*` variable (a flag wins).
// clap turns these doc comments into `--help` text, where `<runtime-dir>` is a
// placeholder, not an HTML tag.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ServeArgs {
    /// Config file (JSON). Missing is fine at the default path, an error elsewhere.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_CONFIG", value_name = "PATH"))]
    pub config: Option<PathBuf>,
    /// Backend to serve: `mock` or `llamacpp` (replaces the config's backend list). An
    /// `openai-compat` upstream is configured in the config file's `backends` list.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_BACKEND", value_name = "KIND"))]
    pub backend: Option<String>,
    /// Runtime directory for the sockets and the lock [default: $XDG_RUNTIME_DIR/inferd,
    /// then ~/.inferd/run, then /tmp/inferd-<uid>].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_RUNTIME_DIR", value_name = "DIR"))]
    pub runtime_dir: Option<String>,
    /// Lock file [default: <runtime-dir>/inferd.lock].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_LOCK", value_name = "PATH"))]
    pub lock: Option<String>,
    /// Inference socket [default: <runtime-dir>/infer.sock].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_UDS", value_name = "PATH"))]
    pub uds: Option<String>,
    /// Admin socket [default: <runtime-dir>/admin.sock].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_ADMIN_ADDR", value_name = "PATH"))]
    pub admin_addr: Option<String>,
    /// Also serve inference on this loopback TCP address (e.g. 127.0.0.1:47321).
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_TCP", value_name = "ADDR"))]
    pub tcp: Option<String>,
    /// Also serve the OpenAI-compatible HTTP API on this loopback TCP address (e.g.
    /// 127.0.0.1:8080). Without --api-key it is open to every local user.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_HTTP", value_name = "ADDR"))]
    pub http: Option<String>,
    /// Key TCP clients must present in their first line, and HTTP clients as
    /// `Authorization: Bearer KEY`.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "INFERD_API_KEY", value_name = "KEY", hide_env_values = true)
    )]
    pub api_key: Option<String>,
    /// Group given read/write access to the inference socket.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_GROUP", value_name = "GROUP"))]
    pub group: Option<String>,
    /// Requests generating at once [default: the sum of the backends' parallelism:
    /// `--n-parallel` for llamacpp, 1 for mock].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_ACTIVE_PERMITS", value_name = "N"))]
    pub active_permits: Option<u32>,
    /// Requests waiting at once [default: 10].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_QUEUE_DEPTH", value_name = "N"))]
    pub queue_depth: Option<u32>,
    /// Give up when the backends are not ready after this long; 0 waits forever [default: 600].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_READY_TIMEOUT_SECS", value_name = "SECS"))]
    pub ready_timeout_secs: Option<u64>,
    /// Drop a client whose frames cannot be written for this long; 0 disables [default: 60].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_WRITE_TIMEOUT_SECS", value_name = "SECS"))]
    pub write_timeout_secs: Option<u64>,
    /// Close a client whose request line is unfinished after this long; 0 disables [default: 60].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_READ_TIMEOUT_SECS", value_name = "SECS"))]
    pub read_timeout_secs: Option<u64>,
    /// Let in-flight generations finish for this long on shutdown [default: 30].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_DRAIN_TIMEOUT_SECS", value_name = "SECS"))]
    pub drain_timeout_secs: Option<u64>,
    /// Open inference connections at most [default: 1024].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MAX_CONNECTIONS", value_name = "N"))]
    pub max_connections: Option<u32>,
    /// Close a TCP client that has not sent its key line after this long; 0 disables
    /// [default: 10]. Unauthenticated TCP clients may also hold at most a quarter of
    /// --max-connections at once, so they cannot lock out Unix-socket clients.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_AUTH_TIMEOUT_SECS", value_name = "SECS"))]
    pub auth_timeout_secs: Option<u64>,
    /// Admin subscribers at most; a newcomer replaces the oldest one that lags behind,
    /// or is refused when none lags [default: 64].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MAX_ADMIN_SUBSCRIBERS", value_name = "N"))]
    pub max_admin_subscribers: Option<u64>,
    /// Activity log directory [default: $INFERD_LOG_DIR, then ~/.inferd/logs].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_LOG_DIR", value_name = "DIR"))]
    pub log_dir: Option<String>,
    /// GGUF model for the llamacpp backend.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MODEL_PATH", value_name = "PATH"))]
    pub model_path: Option<String>,
    /// Refuse to start unless the model file has this SHA-256.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MODEL_SHA256", value_name = "HEX"))]
    pub model_sha256: Option<String>,
    /// Context length of each llamacpp sequence; 0 uses the model's [default: 4096]. The
    /// KV cache holds n_parallel x n_ctx tokens.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_N_CTX", value_name = "N"))]
    pub n_ctx: Option<u32>,
    /// Sequences a llamacpp backend decodes together (continuous batching) [default: 4].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_N_PARALLEL", value_name = "N"))]
    pub n_parallel: Option<u32>,
    /// Layers to offload to a GPU (llamacpp) [default: 0].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_N_GPU_LAYERS", value_name = "N"))]
    pub n_gpu_layers: Option<u32>,
    /// CPU threads for llamacpp [default: up to 4].
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_N_THREADS", value_name = "N"))]
    pub n_threads: Option<u32>,
    /// Mock: produce exactly N tokens (cycling the echoed words).
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MOCK_TOKENS", value_name = "N"))]
    pub mock_tokens: Option<u32>,
    /// Mock: delay before each token.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MOCK_TOKEN_DELAY_MS", value_name = "MS"))]
    pub mock_token_delay_ms: Option<u64>,
    /// Mock: fail `before` the stream or `after:N` tokens.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MOCK_FAIL", value_name = "WHEN"))]
    pub mock_fail: Option<String>,
    /// Mock: take this long to load, publishing progress.
    #[cfg_attr(feature = "cli", arg(long, env = "INFERD_MOCK_LOAD_MS", value_name = "MS"))]
    pub mock_load_ms: Option<u64>,
}

/// Why `serve` cannot start: what to tell the operator, and which kind of failure it is
/// (the shells map the kind to an exit status). Where the failure has a typed cause (a
/// backend's options, say), [`std::error::Error::source`] hands it out.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartError {
    /// What to tell the operator.
    pub message: String,
    /// Whose mistake it is.
    pub kind: StartErrorKind,
    /// The typed cause, when there is one.
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The two kinds of start-up failure, which a shell tells apart in its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartErrorKind {
    /// A configuration or usage mistake: fixing the flags or the config file helps.
    Usage,
    /// Anything else: the lock is held, a file cannot be created, a model fails to load.
    Failed,
}

impl StartErrorKind {
    /// The exit status the `serve` commands use for it: 2 for a usage mistake, as for
    /// bad flags, and 1 for any other failure.
    pub fn exit_status(self) -> u8 {
        match self {
            StartErrorKind::Usage => 2,
            StartErrorKind::Failed => 1,
        }
    }
}

impl StartError {
    /// A configuration mistake.
    pub fn usage(message: impl Into<String>) -> Self {
        StartError { message: message.into(), kind: StartErrorKind::Usage, source: None }
    }
    /// Any other start-up failure.
    pub fn fail(message: impl Into<String>) -> Self {
        StartError { message: message.into(), kind: StartErrorKind::Failed, source: None }
    }
    /// Any other start-up failure with a typed cause, told as the cause's own message.
    pub fn fail_from(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        StartError::fail(cause.to_string()).because(cause)
    }
    /// The same error, with `cause` as its typed source (the message stays as it is).
    pub fn because(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(cause));
        self
    }
    /// A configuration mistake with a typed cause, told as the cause's own message.
    pub fn usage_from(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        StartError {
            message: cause.to_string(),
            kind: StartErrorKind::Usage,
            source: Some(Box::new(cause)),
        }
    }
}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::usage_from(e)
    }
}

impl From<BackendError> for StartError {
    fn from(e: BackendError) -> Self {
        StartError::usage_from(e)
    }
}

impl ServeArgs {
    /// The flags (and variables) as a settings layer.
    pub fn to_settings(&self) -> Result<Settings, ConfigError> {
        let mut s = Settings::default();
        let mut set = |key: &str, v: Option<Value>| -> Result<(), ConfigError> {
            match v {
                Some(v) => s.set(key, &v),
                None => Ok(()),
            }
        };
        set("backend", self.backend.clone().map(Value::from))?;
        set("runtime_dir", self.runtime_dir.clone().map(Value::from))?;
        set("lock", self.lock.clone().map(Value::from))?;
        set("uds", self.uds.clone().map(Value::from))?;
        set("admin_addr", self.admin_addr.clone().map(Value::from))?;
        set("tcp", self.tcp.clone().map(Value::from))?;
        set("http", self.http.clone().map(Value::from))?;
        set("api_key", self.api_key.clone().map(Value::from))?;
        set("group", self.group.clone().map(Value::from))?;
        set("active_permits", self.active_permits.map(Value::from))?;
        set("queue_depth", self.queue_depth.map(Value::from))?;
        set("ready_timeout_secs", self.ready_timeout_secs.map(Value::from))?;
        set("write_timeout_secs", self.write_timeout_secs.map(Value::from))?;
        set("read_timeout_secs", self.read_timeout_secs.map(Value::from))?;
        set("drain_timeout_secs", self.drain_timeout_secs.map(Value::from))?;
        set("max_connections", self.max_connections.map(Value::from))?;
        set("auth_timeout_secs", self.auth_timeout_secs.map(Value::from))?;
        set("max_admin_subscribers", self.max_admin_subscribers.map(Value::from))?;
        set("log_dir", self.log_dir.clone().map(Value::from))?;
        set("model_path", self.model_path.clone().map(Value::from))?;
        set("model_sha256", self.model_sha256.clone().map(Value::from))?;
        set("n_ctx", self.n_ctx.map(Value::from))?;
        set("n_parallel", self.n_parallel.map(Value::from))?;
        set("n_gpu_layers", self.n_gpu_layers.map(Value::from))?;
        set("n_threads", self.n_threads.map(Value::from))?;
        set("mock_tokens", self.mock_tokens.map(Value::from))?;
        set("mock_token_delay_ms", self.mock_token_delay_ms.map(Value::from))?;
        set("mock_fail", self.mock_fail.clone().map(Value::from))?;
        set("mock_load_ms", self.mock_load_ms.map(Value::from))?;
        Ok(s)
    }

    /// The config file's settings layered under the flags.
    pub fn settings(&self) -> Result<Settings, StartError> {
        let (path, explicit) = match &self.config {
            Some(p) => (Some(p.clone()), true),
            None => (paths::default_config_path(), false),
        };
        let mut settings = match path {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => Settings::from_json(&text).map_err(|e| {
                    StartError::usage(format!("{}: {e}", path.display())).because(e)
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                    Settings::default()
                }
                Err(e) => {
                    let message = format!("cannot read config file {}: {e}", path.display());
                    return Err(StartError::usage(message).because(e));
                }
            },
            None => Settings::default(),
        };
        settings.merge(self.to_settings()?);
        Ok(settings)
    }
}

/// Why a configured backend's engine cannot be built; the message names the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A `mock` backend's options are wrong.
    #[error("backend {backend}: {source}")]
    Mock {
        /// The backend, as configured (kind and name).
        backend: String,
        /// What is wrong.
        #[source]
        source: inferd_engine_mock::ConfigError,
    },
    /// A `llamacpp` backend's options are wrong.
    #[cfg(feature = "llama")]
    #[error("backend {backend}: {source}")]
    Llama {
        /// The backend, as configured (kind and name).
        backend: String,
        /// What is wrong.
        #[source]
        source: inferd_engine_llama::ConfigError,
    },
    /// An `openai-compat` backend's options are wrong.
    #[error("backend {backend}: {source}")]
    OpenAi {
        /// The backend, as configured (kind and name).
        backend: String,
        /// What is wrong.
        #[source]
        source: inferd_engine_openai_compat::ConfigError,
    },
    /// A `llamacpp` backend in a build without the `llama` feature.
    #[error("backend {backend}: this build has no llama.cpp support (feature `llama` is off)")]
    NoLlama {
        /// The backend, as configured (kind and name).
        backend: String,
    },
    /// A kind no engine here serves.
    #[error("backend {backend}: unknown kind {kind:?}")]
    UnknownKind {
        /// The backend, as configured (kind and name).
        backend: String,
        /// The kind as written.
        kind: String,
    },
}

/// Builds the engine for one configured backend.
pub fn build_engine(spec: &BackendSpec) -> Result<Arc<dyn Engine>, BackendError> {
    let backend = || spec.to_string();
    match spec.kind.as_str() {
        "mock" => {
            let cfg = MockConfig::from_options(&spec.options)
                .map_err(|source| BackendError::Mock { backend: backend(), source })?;
            Ok(Arc::new(MockEngine::new(cfg)))
        }
        #[cfg(feature = "llama")]
        "llamacpp" => {
            let cfg = LlamaConfig::from_options(&spec.options)
                .map_err(|source| BackendError::Llama { backend: backend(), source })?;
            Ok(Arc::new(LlamaEngine::new(cfg)))
        }
        #[cfg(not(feature = "llama"))]
        "llamacpp" => Err(BackendError::NoLlama { backend: backend() }),
        "openai-compat" => {
            let cfg = OpenAiConfig::from_options(&spec.options)
                .map_err(|source| BackendError::OpenAi { backend: backend(), source })?;
            Ok(Arc::new(OpenAiEngine::new(cfg)))
        }
        other => Err(BackendError::UnknownKind { backend: backend(), kind: other.to_owned() }),
    }
}

/// The daemon's configuration for `settings` serving `engines`: `active_permits`, unless
/// set, follows the engines' parallelism ([`default_active_permits`]).
pub fn daemon_config(
    settings: &Settings,
    engines: &[Arc<dyn Engine>],
) -> Result<DaemonConfig, ConfigError> {
    let mut config = settings.daemon_config()?;
    if settings.active_permits.is_none() {
        config.active_permits = default_active_permits(engines);
    }
    Ok(config)
}

/// The `active_permits` used when none is configured: as many requests generate at
/// once as the backends can run together (the sum of their parallelism, at least 1),
/// so a backend that batches gets enough requests to batch.
pub fn default_active_permits(engines: &[Arc<dyn Engine>]) -> u32 {
    engines.iter().fold(0u32, |sum, e| sum.saturating_add(e.parallelism().max(1))).max(1)
}

/// Where the daemon's files go, resolved from the settings.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The runtime directory (created 0700).
    pub runtime_dir: PathBuf,
    /// The lock file.
    pub lock: PathBuf,
    /// The inference socket.
    pub infer: PathBuf,
    /// The admin socket.
    pub admin: PathBuf,
    /// The activity log directory, if one is kept.
    pub log_dir: Option<PathBuf>,
}

impl Paths {
    /// Resolves every path from the settings and the spec's defaults.
    pub fn resolve(s: &Settings) -> Paths {
        let runtime_dir =
            s.runtime_dir.as_ref().map(PathBuf::from).unwrap_or_else(paths::runtime_dir);
        let under = |v: &Option<String>, leaf: &str| {
            v.as_ref().map(PathBuf::from).unwrap_or_else(|| runtime_dir.join(leaf))
        };
        Paths {
            lock: under(&s.lock, paths::LOCK_FILE),
            infer: under(&s.uds, paths::INFER_SOCKET),
            admin: under(&s.admin_addr, paths::ADMIN_SOCKET),
            log_dir: s.log_dir.as_ref().map(PathBuf::from).or_else(paths::default_log_dir),
            runtime_dir,
        }
    }
}

/// A daemon ready to run: the lock is held, the admin socket bound.
pub struct Prepared {
    /// What the driver needs.
    pub setup: ServeSetup,
    /// The single-instance lock; keep it alive while serving.
    pub lock: InstanceLock,
    /// The resolved paths, for messages.
    pub paths: Paths,
}

/// The message given when no backend is configured.
pub const NO_BACKEND: &str = "no backend configured.\n\
  Serve a model:        inferd serve --backend llamacpp --model-path /path/to/model.gguf\n\
  Try it without one:   inferd serve --backend mock\n\
  Or list backends in the config file (~/.inferd/config.json):\n\
    {\"backends\": [{\"kind\": \"llamacpp\", \"model_path\": \"/path/to/model.gguf\"}]}";

/// Resolves the configuration and does everything before the event loop: validates,
/// builds engines, creates the runtime directory, takes the lock, binds the admin
/// socket and opens the activity log.
pub fn prepare(args: &ServeArgs) -> Result<Prepared, StartError> {
    let settings = args.settings()?;
    settings.daemon_config()?;
    let specs = settings.resolved_backends();
    if specs.is_empty() {
        return Err(StartError::usage(NO_BACKEND));
    }
    let engines = specs.iter().map(build_engine).collect::<Result<Vec<_>, _>>()?;
    let config = daemon_config(&settings, &engines)?;
    prepare_files(
        config,
        engines,
        Paths::resolve(&settings),
        settings.group.clone(),
        settings.tcp.clone(),
        settings.http.clone(),
    )
}

/// The file-system steps of start-up for a resolved configuration: checks the TCP
/// address, creates the private directories, takes the lock, binds the admin socket
/// (0600), opens the activity log, raises the soft descriptor limit to the hard one and
/// clamps `max_connections` to what it allows (see [`fdlimit`]). Embedding hosts call
/// this directly.
pub fn prepare_files(
    config: DaemonConfig,
    engines: Vec<Arc<dyn Engine>>,
    paths: Paths,
    group: Option<String>,
    tcp: Option<String>,
    http: Option<String>,
) -> Result<Prepared, StartError> {
    for addr in [&tcp, &http].into_iter().flatten() {
        socket::parse_loopback_addr(addr).map_err(StartError::usage_from)?;
    }
    let dirs = [
        Some(paths.runtime_dir.as_path()),
        paths.lock.parent(),
        paths.infer.parent(),
        paths.admin.parent(),
    ];
    for dir in dirs.into_iter().flatten() {
        if dir.as_os_str().is_empty() {
            continue;
        }
        paths::ensure_private_dir(dir).map_err(StartError::fail_from)?;
    }
    let lock = InstanceLock::acquire(&paths.lock).map_err(StartError::fail_from)?;
    let admin = socket::bind_unix_listener(&paths.admin, 0o600).map_err(StartError::fail_from)?;
    let mut log = match &paths.log_dir {
        Some(dir) => Some(ActivityLogFile::open(dir).map_err(StartError::fail_from)?),
        None => None,
    };
    let mut config = config;
    fit_connections_to_descriptors(&mut config, log.as_mut());
    if let Some(addr) = &tcp
        && config.api_key.is_none()
    {
        warn_tcp_without_key(addr, log.as_mut());
    }
    if let Some(addr) = &http
        && config.api_key.is_none()
    {
        warn_tcp_without_key(addr, log.as_mut());
    }
    Ok(Prepared {
        setup: ServeSetup {
            config,
            engines,
            admin,
            admin_path: paths.admin.clone(),
            infer_path: paths.infer.clone(),
            group,
            tcp,
            http,
            log,
        },
        lock,
        paths,
    })
}

/// Raises the soft descriptor limit and lowers `max_connections` to what it leaves room
/// for, warning on stderr and in the activity log (naming both numbers) when it must.
fn fit_connections_to_descriptors(config: &mut DaemonConfig, log: Option<&mut ActivityLogFile>) {
    let Some(limit) = fdlimit::raise_descriptor_limit() else { return };
    let in_use = match fdlimit::open_descriptors() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("inferd: cannot count open descriptors ({e}); max_connections left as set");
            return;
        }
    };
    let admins = u64::try_from(config.max_admin_subscribers).unwrap_or(u64::MAX);
    let allowed = fdlimit::connection_allowance(limit, in_use, admins);
    let wanted = config.max_connections;
    if u64::from(wanted) <= allowed {
        return;
    }
    // `allowed` < `wanted`, a u32.
    let allowed = u32::try_from(allowed).unwrap_or(wanted);
    config.max_connections = allowed;
    eprintln!(
        "inferd: warning: max_connections {wanted} is more than the descriptor limit of \
         {limit} allows ({in_use} in use, {} reserved, {admins} for admin subscribers): \
         serving at most {allowed} connections",
        fdlimit::RESERVED_DESCRIPTORS
    );
    if let Some(log) = log {
        log.push(
            &Record::new(time::unix_millis_now(), Level::Warn, "daemon", "max_connections_clamped")
                .num("max_connections", u64::from(wanted))
                .num("allowed", u64::from(allowed))
                .num("descriptor_limit", limit)
                .finish(),
        );
    }
}

/// Loopback TCP without an API key lets every local user and process in, whatever the
/// socket modes say: allowed (the spec makes the key optional on loopback), but loudly.
fn warn_tcp_without_key(addr: &str, log: Option<&mut ActivityLogFile>) {
    eprintln!(
        "inferd: WARNING: serving TCP on {addr} without an API key: any local user or process \
         can use the daemon (set --api-key or INFERD_API_KEY)"
    );
    if let Some(log) = log {
        log.push(
            &Record::new(time::unix_millis_now(), Level::Warn, "daemon", "tcp_without_api_key")
                .str("addr", addr)
                .finish(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(backend: &str) -> ServeArgs {
        ServeArgs {
            config: Some(PathBuf::from("/dev/null/none")),
            backend: Some(backend.into()),
            model_path: Some("/m.gguf".into()),
            ..ServeArgs::default()
        }
    }

    fn engines_of(settings: &Settings) -> Vec<Arc<dyn Engine>> {
        settings.resolved_backends().iter().map(build_engine).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn n_parallel_reaches_the_llama_backend_and_the_permits() {
        let a = ServeArgs { n_parallel: Some(3), ..args("llamacpp") };
        let settings = a.to_settings().unwrap();
        let engines = engines_of(&settings);
        assert_eq!(engines[0].parallelism(), 3);
        assert_eq!(daemon_config(&settings, &engines).unwrap().active_permits, 3);

        // The default parallelism of llamacpp is 4; the mock's stays 1.
        let settings = args("llamacpp").to_settings().unwrap();
        let engines = engines_of(&settings);
        assert_eq!(daemon_config(&settings, &engines).unwrap().active_permits, 4);
        let settings = args("mock").to_settings().unwrap();
        let engines = engines_of(&settings);
        assert_eq!(daemon_config(&settings, &engines).unwrap().active_permits, 1);

        // An explicit value wins.
        let a = ServeArgs { active_permits: Some(2), n_parallel: Some(8), ..args("llamacpp") };
        let settings = a.to_settings().unwrap();
        let engines = engines_of(&settings);
        assert_eq!(daemon_config(&settings, &engines).unwrap().active_permits, 2);
    }

    #[test]
    fn openai_compat_backends_count_their_concurrency_toward_the_permits() {
        let settings = Settings::from_json(
            r#"{"backends": [{"kind": "openai-compat", "name": "cloud", "model": "m",
                              "base_url": "http://127.0.0.1:1", "max_concurrency": 5},
                             {"kind": "mock"}]}"#,
        )
        .unwrap();
        let engines = engines_of(&settings);
        assert_eq!(engines[0].kind(), "openai-compat");
        assert_eq!(daemon_config(&settings, &engines).unwrap().active_permits, 6);
        let missing = Settings::from_json(r#"{"backends": [{"kind": "openai-compat"}]}"#).unwrap();
        let err = missing.resolved_backends().iter().map(build_engine).next().unwrap().err();
        assert!(err.as_ref().is_some_and(|e| e.to_string().contains("base_url")), "{err:?}");
        // The engine's own error travels typed under the backend's.
        assert!(matches!(
            err,
            Some(BackendError::OpenAi {
                source: inferd_engine_openai_compat::ConfigError::Missing { key: "base_url" },
                ..
            })
        ));
    }

    #[test]
    fn permits_sum_over_backends() {
        let settings = Settings::from_json(
            r#"{"backends": [{"kind": "llamacpp", "model_path": "/m", "n_parallel": 6},
                             {"kind": "mock"}]}"#,
        )
        .unwrap();
        let engines = engines_of(&settings);
        assert_eq!(daemon_config(&settings, &engines).unwrap().active_permits, 7);
        assert!(
            Settings::from_json(
                r#"{"backends": [{"kind": "llamacpp", "model_path": "/m", "n_parallel": 0}]}"#
            )
            .map(|s| s.resolved_backends().iter().map(build_engine).all(|e| e.is_err()))
            .unwrap()
        );
    }
}
