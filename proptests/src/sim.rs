//! The deterministic simulator: the real [`Daemon`] inside a simulated world.
//!
//! One seed drives everything: the configuration, simulated clients (well-behaved, slow
//! readers, slow senders, disconnecting, half-closing, pipelining, malformed, oversize,
//! bursts, TCP authentication; and HTTP clients of the OpenAI API: keep-alive chat
//! completions streamed or not, going away mid-answer, malformed heads), simulated engines
//! (per-token delays, failures before and during the stream, an upstream's 429/503 with a
//! `Retry-After` hint the breaker must honour, hangs, UTF-8 split across tokens), backend loading and readiness
//! flapping, admin subscribers (some stalled), a clock with occasional large jumps, and a
//! shutdown at a random moment. The simulator plays the shell's part of the contract
//! (one read per credit, one send in flight, `Flushed` after delivery, nothing after
//! `Close`, `Timeout` once the deadline passes) and checks the daemon's invariants after
//! every step, panicking with a clear message. [`run_seed`] catches that panic and
//! returns it with a trace of the last events, so a failing seed is printed and replays
//! exactly.
//!
//! Entity-local random generators (per connection, per generation) keep runs
//! deterministic even where the daemon emits outputs in hash-map order (at shutdown).

mod http_client;
mod scripts;
mod trace;

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use inferd_core::engine::{Capabilities, EngineError, EngineErrorKind, EngineEvent, LoadPhase};
use inferd_core::router::{BackendId, BreakerPolicy, Outcome, Route};
use inferd_core::{
    ConnId, Daemon, DaemonConfig, GenId, Input, ListenerKind, MAX_AUTH_LINE_BYTES, Output, Peer,
    Time, Transport,
};
use serde_json::Value;

use crate::model::RouterModel;
use crate::rng::Rng;
use scripts::{Action, Ctx, Expect, ReqSpec, Step};
use trace::{Dir, Trace};

pub use trace::{TRACE_LEN, TraceMode};

/// The drain grace the daemon adds after the drain deadline before it gives up on flushes.
const DRAIN_GRACE_MS: u64 = 2_000;

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct SimParams {
    /// Most inference clients in a run.
    pub max_clients: u64,
    /// Most admin subscribers in a run.
    pub max_admins: u64,
    /// Longest window (ms of simulated time) in which clients arrive.
    pub max_horizon_ms: u64,
    /// Steps after which a run counts as not terminating.
    pub max_steps: u64,
}

impl SimParams {
    /// The size used for seeds (runner and tests).
    pub const SEEDS: SimParams =
        SimParams { max_clients: 24, max_admins: 2, max_horizon_ms: 30_000, max_steps: 500_000 };
    /// A smaller size for fuzzing, where the input bytes drive the run.
    pub const FUZZ: SimParams =
        SimParams { max_clients: 3, max_admins: 1, max_horizon_ms: 1_000, max_steps: 100_000 };
}

/// What a passing run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    /// Request lines fully written by clients (valid requests).
    pub requests: u64,
    /// Simulation steps (events and timeouts).
    pub steps: u64,
    /// Simulated time covered, in ms.
    pub sim_ms: u64,
    /// How often the interesting paths were taken.
    pub coverage: Coverage,
}

macro_rules! coverage {
    ($($field:ident: $doc:literal),* $(,)?) => {
        /// Counters of the paths a run took, to show what the simulation exercises.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Coverage {
            $(#[doc = $doc] pub $field: u64,)*
        }

        impl Coverage {
            /// Adds another run's counters.
            pub fn add(&mut self, o: &Coverage) {
                $(self.$field += o.$field;)*
            }
        }

        impl fmt::Display for Coverage {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut first = true;
                $(
                    if !first { f.write_str(", ")?; }
                    first = false;
                    write!(f, "{} {}", stringify!($field), self.$field)?;
                )*
                let _ = first;
                Ok(())
            }
        }
    };
}

coverage! {
    done: "`done` frames",
    tokens: "`token` frames",
    queue_full: "`queue_full` errors",
    no_backend: "`backend_unavailable` with no backend to route to",
    backend_failed: "errors for engine failures (before or during the stream)",
    engine_invalid: "`invalid_request` errors for client errors only the engine saw",
    over_cap_done: "`done` replaced by an error for exceeding the frame cap",
    invalid: "`invalid_request` errors",
    too_large: "`frame_too_large` errors",
    draining: "requests refused or cut by draining",
    trials: "half-open trial requests started",
    retry_after_hints: "engine failures carrying a Retry-After hint (upstream 429/503)",
    shared_failures: "engine failures that name an incident shared with other requests",
    cancels: "generations cancelled",
    queued_cancels: "requests cancelled while queued",
    lost_terminal: "terminal frames lost with a dropped connection",
    client_hangups: "clients that hung up",
    daemon_closes: "connections the daemon closed on its own",
    refused: "connections refused at once (max_connections)",
    admin_drops: "admin subscribers dropped by the daemon",
    fifo_pairs: "pairs of queued requests checked for arrival order",
    clock_jumps: "clock jumps",
    http_done: "HTTP chat completions answered in full",
    http_errors: "HTTP chat completions answered with an error",
    http_malformed: "malformed HTTP heads answered 400 and closed",
    exit0: "orderly exits",
    exit1: "failed starts (exit 1)",
}

/// A failing run: the broken invariant, the run's configuration and its last events.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed, when the run was seeded (not for fuzzer inputs).
    pub seed: Option<u64>,
    /// The panic message: which invariant broke, and how.
    pub message: String,
    /// The run's configuration in one line.
    pub config: String,
    /// The last [`TRACE_LEN`] events, oldest first.
    pub trace: Vec<String>,
}

impl Failure {
    /// The command that replays this failure.
    pub fn replay_command(&self) -> String {
        match self.seed {
            Some(s) => format!("cargo run -p inferd-proptests --release --bin sim -- --seed {s}"),
            None => "(fuzzer input: replay with the fuzz artifact)".into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seed {
            Some(s) => writeln!(f, "seed {s} FAILED")?,
            None => writeln!(f, "fuzz input FAILED")?,
        }
        writeln!(f, "replay: {}", self.replay_command())?;
        if self.seed.is_some() {
            writeln!(
                f,
                "full trace: {} --trace (add --conn N for one connection)",
                self.replay_command()
            )?;
        }
        writeln!(f, "config: {}", self.config)?;
        writeln!(f, "invariant: {}", self.message)?;
        writeln!(f, "last {} events (-> input, <- output, .. simulated world):", self.trace.len())?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that keeps panics inside simulated runs quiet (their
/// message is captured for the [`Failure`]) and leaves every other panic to the
/// previous hook.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let msg = match (
                    info.payload().downcast_ref::<&str>(),
                    info.payload().downcast_ref::<String>(),
                ) {
                    (Some(s), _) => (*s).to_string(),
                    (_, Some(s)) => s.clone(),
                    _ => "(non-string panic payload)".into(),
                };
                let loc = info.location().map(|l| format!(" [at {l}]")).unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{loc}")));
            } else {
                prev(info);
            }
        }));
    });
}

/// Runs one seed at the default size.
pub fn run_seed(seed: u64) -> Result<RunStats, Failure> {
    run_seed_with(seed, SimParams::SEEDS)
}

/// Runs one seed at the given size, catching the panic of a broken invariant.
pub fn run_seed_with(seed: u64, params: SimParams) -> Result<RunStats, Failure> {
    run_caught(Rng::new(seed), seed, Some(seed), params, TraceMode::Tail).0
}

/// A seed's run as a reader sees it: its configuration, its events (all of them, or one
/// connection's, as `mode` says), and how it ended. Deterministic: the same seed gives
/// the same lines byte for byte.
pub fn trace_seed(seed: u64, mode: TraceMode) -> (String, Vec<String>, Result<RunStats, Failure>) {
    let (result, run) = run_caught(Rng::new(seed), seed, Some(seed), SimParams::SEEDS, mode);
    let (config, trace) = run.unwrap_or_default();
    (config, trace, result)
}

/// Runs the simulator with a fuzzer's bytes as its random stream; `Err` when an invariant broke.
pub fn run_bytes(data: &[u8]) -> Result<RunStats, Failure> {
    let mut rng = Rng::from_bytes(data);
    let tag = rng.next_u64() % 1_000_000;
    run_caught(rng, tag, None, SimParams::FUZZ, TraceMode::Tail).0
}

/// A traced run's configuration line and its events.
type TracedRun = (String, Vec<String>);

fn run_caught(
    rng: Rng,
    tag: u64,
    seed: Option<u64>,
    params: SimParams,
    mode: TraceMode,
) -> (Result<RunStats, Failure>, Option<TracedRun>) {
    install_panic_hook();
    let was_quiet = QUIET.with(|q| q.replace(true));
    LAST_PANIC.with(|p| p.borrow_mut().take());
    let mut sim: Option<Sim> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let s = sim.insert(Sim::new(rng, tag, params));
        s.trace = Trace::new(mode);
        s.run();
    }));
    QUIET.with(|q| q.set(was_quiet));
    let run = match (&sim, mode) {
        (Some(s), TraceMode::Full | TraceMode::Conn(_)) => Some((s.describe(), s.trace.render())),
        _ => None,
    };
    let result = match result {
        Ok(()) => {
            let s = sim.as_ref().map(Sim::stats).unwrap_or_default();
            Ok(s)
        }
        Err(payload) => {
            let message = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| {
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into())
            });
            let (config, trace) = match &sim {
                Some(s) => (s.describe(), s.trace.render()),
                None => ("(failed while building the run)".into(), Vec::new()),
            };
            Err(Failure { seed, message, config, trace })
        }
    };
    (result, run)
}

/// Mixes two values into a seed (for entity-local generators).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A frame for a message: whole when short, else its head and tail.
fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.len() <= 300 {
        return s.into_owned();
    }
    let head = &s[..s.floor_char_boundary(150)];
    let tail = &s[s.ceil_char_boundary(s.len() - 150)..];
    format!("{head}…{tail}")
}

/// Events of the simulated world, in the agenda.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    BackendLoad(usize, u32),
    BackendFlap(usize),
    BackendBack(usize),
    Shutdown,
    ClockJump(u64),
    NewAdmin(u64),
    NewClient(u64),
    ClientWake(u64, u64),
    ShellRead(u64),
    ShellFlush(u64, u64),
    ShellHangup(u64),
    EngineWake(u64),
    ForceHangups,
    FinalCheck,
}

impl Ev {
    /// (class, entity) for deterministic ordering of events at the same instant.
    fn key(self) -> (u8, u64) {
        match self {
            Ev::BackendLoad(b, _) => (0, b as u64),
            Ev::BackendFlap(b) | Ev::BackendBack(b) => (1, b as u64),
            Ev::Shutdown => (2, 0),
            Ev::ClockJump(_) => (3, 0),
            Ev::NewAdmin(k) => (4, k),
            Ev::NewClient(k) => (5, k),
            Ev::ClientWake(c, _) => (6, c),
            Ev::ShellRead(c) => (7, c),
            Ev::ShellFlush(c, _) => (8, c),
            Ev::ShellHangup(c) => (9, c),
            Ev::EngineWake(g) => (10, g),
            Ev::ForceHangups => (11, 0),
            Ev::FinalCheck => (12, 0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Inference,
    Admin,
    /// The HTTP API (OpenAI chat completions) on the same admission queue.
    Http,
}

/// A pending write of a client.
#[derive(Debug)]
struct Writing {
    bytes: Vec<u8>,
    pos: usize,
    marks: VecDeque<(usize, Expect)>,
    chunk_max: usize,
    gap_ms: u64,
}

/// A connection: the shell's view (credits, sends) and the client's (script, replies).
#[derive(Debug)]
struct Conn {
    kind: Kind,
    rng: Rng,
    closed: bool,
    credit: bool,
    inbound: VecDeque<u8>,
    eof_written: bool,
    hung_up: bool,
    /// Terminal frames in the `Send` in flight.
    in_flight: Option<u64>,
    flush_token: u64,
    stall_until: u64,
    /// What each line written expects, oldest unanswered first.
    expect: VecDeque<Expect>,
    cur_tokens: String,
    must_close: bool,
    delivered_terminals: u64,
    expected_terminals: u64,
    script: VecDeque<Action>,
    writing: Option<Writing>,
    await_deadline: Option<u64>,
    waiting: bool,
    wake_token: u64,
    /// Still inside the `Accepted` input (a close now is a refusal).
    fresh: bool,
    /// An admin subscriber was sent the `draining` status.
    saw_draining: bool,
    /// HTTP: response bytes not yet parsed into whole responses.
    http_buf: Vec<u8>,
    /// HTTP: bytes the client has written, and bytes the shell has fed the daemon.
    written: usize,
    fed: usize,
    /// HTTP: where in the written bytes each chat request ends, and its number.
    chat_ends: VecDeque<(usize, usize)>,
}

impl Conn {
    fn new(kind: Kind, rng: Rng, script: Vec<Action>) -> Conn {
        Conn {
            kind,
            rng,
            closed: false,
            credit: false,
            inbound: VecDeque::new(),
            eof_written: false,
            hung_up: false,
            in_flight: None,
            flush_token: 0,
            stall_until: 0,
            expect: VecDeque::new(),
            cur_tokens: String::new(),
            must_close: false,
            delivered_terminals: 0,
            expected_terminals: 0,
            script: script.into(),
            writing: None,
            await_deadline: None,
            waiting: false,
            wake_token: 0,
            fresh: true,
            saw_draining: false,
            http_buf: Vec::new(),
            written: 0,
            fed: 0,
            chat_ends: VecDeque::new(),
        }
    }
}

/// The life of one valid request, as the simulation observed it.
#[derive(Clone, Debug, Default)]
struct ReqState {
    conn: u64,
    written: bool,
    generation: Option<u64>,
    started_at: Option<u64>,
    /// Admission time, derived from timings (exact: the clock counts whole ms).
    admitted_at: Option<u64>,
    /// Cancelled while queued, at this time.
    queued_cancel_at: Option<u64>,
    cancel_record: bool,
    end_record: bool,
    terminal: bool,
    /// Finished, but its terminal frame was lost with a dropped connection.
    lost_ok: bool,
}

#[derive(Clone, Debug)]
enum GenEnd {
    Done(inferd_core::engine::Completion),
    Failed(EngineErrorKind),
}

#[derive(Debug)]
struct Gen {
    req: usize,
    backend: BackendId,
    route: Route,
    rng: Rng,
    script: VecDeque<(u64, Step)>,
    bytes: Vec<u8>,
    token_events: u32,
    first_token_at: Option<u64>,
    started_at: u64,
    ended_at: Option<u64>,
    end: Option<GenEnd>,
    attached: bool,
    cancelled_at: Option<u64>,
}

#[derive(Debug)]
struct BackendSim {
    name: String,
    phases: u32,
    per_phase_ms: u64,
    loaded: bool,
    ready: bool,
    down: Vec<(u64, u64)>,
}

impl BackendSim {
    fn is_down(&self, now: u64) -> bool {
        self.down.iter().any(|&(a, b)| a <= now && now < b)
    }
}

/// Ways a run may legitimately end with a non-zero exit.
#[derive(Debug, Default)]
struct Scenario {
    /// This backend fails to load at this phase step.
    load_fail: Option<(usize, u32)>,
    /// Loading outlasts `ready_timeout`.
    slow_load: bool,
}

/// Events by (time, class, entity, insertion order).
type Agenda = BinaryHeap<Reverse<(u64, u8, u64, u64, Ev)>>;

struct Sim {
    rng: Rng,
    base: u64,
    tag: u64,
    params: SimParams,
    cfg: DaemonConfig,
    scenario: Scenario,
    d: Daemon,
    now: u64,
    agenda: Agenda,
    seq: u64,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    gens: BTreeMap<u64, Gen>,
    specs: Vec<ReqSpec>,
    reqs: Vec<ReqState>,
    req_by_id: HashMap<String, usize>,
    next_bad: u64,
    backends: Vec<BackendSim>,
    model: RouterModel,
    horizon: u64,
    clients_planned: u64,
    bound: bool,
    stop_accepting: bool,
    shutdown_at: Option<u64>,
    exited: Option<(i32, String)>,
    served_records: u64,
    queue_full_records: u64,
    requests_written: u64,
    attached: usize,
    live_gens: usize,
    open_inference: usize,
    steps: u64,
    trace: Trace,
    cov: Coverage,
    /// The largest `Received` fed so far.
    largest_read: usize,
    /// The id the daemon gives the next HTTP chat request it takes (it counts them).
    next_http_id: u64,
}

impl Sim {
    fn new(mut rng: Rng, tag: u64, params: SimParams) -> Sim {
        let n_backends = rng.range_usize(1, 3);
        let names = ["alpha", "beta", "gamma"];
        let secs = |rng: &mut Rng, lo: u64, hi: u64| Duration::from_secs(rng.range(lo, hi));
        let mut scenario = Scenario::default();
        let mut cfg = DaemonConfig {
            active_permits: rng.range(1, 3) as u32,
            queue_depth: rng.range(0, 5) as u32,
            max_frame_bytes: *rng.pick(&[1024, 2048, 4096, 4096, 8192]),
            write_timeout: if rng.chance(1, 10) { Duration::ZERO } else { secs(&mut rng, 1, 10) },
            read_timeout: if rng.chance(1, 10) { Duration::ZERO } else { secs(&mut rng, 1, 10) },
            max_connections: if rng.chance(3, 10) { rng.range(2, 16) as u32 } else { 1024 },
            drain_timeout: secs(&mut rng, 1, 10),
            stats_interval: Duration::from_millis(rng.range(100, 2000)),
            admin_lag_limit: rng.range_usize(4, 64),
            max_admin_subscribers: rng.range_usize(1, 3),
            auth_timeout: if rng.chance(1, 5) { Duration::ZERO } else { secs(&mut rng, 1, 10) },
            breaker: BreakerPolicy {
                failure_threshold: rng.range(1, 4) as u32,
                failure_window: secs(&mut rng, 2, 60),
                cooldown: secs(&mut rng, 1, 20),
            },
            ready_timeout: if rng.chance(1, 2) { Duration::ZERO } else { secs(&mut rng, 200, 600) },
            api_key: if rng.chance(3, 20) {
                Some(format!("k3y-{}", rng.below(1_000_000)))
            } else {
                None
            },
            backends: names[..n_backends].iter().map(|s| s.to_string()).collect(),
            timings: !rng.chance(1, 10),
        };
        if rng.chance(1, 50) {
            scenario.load_fail = Some((rng.range_usize(0, n_backends - 1), rng.range(0, 2) as u32));
        } else if rng.chance(1, 50) {
            scenario.slow_load = true;
            cfg.ready_timeout = Duration::from_millis(rng.range(500, 2000));
        }
        let backends = cfg
            .backends
            .iter()
            .map(|name| BackendSim {
                name: name.clone(),
                phases: rng.range(0, 3) as u32,
                per_phase_ms: rng.range(10, 400),
                loaded: false,
                ready: false,
                down: Vec::new(),
            })
            .collect();
        let base = rng.next_u64();
        let d = Daemon::new(cfg.clone(), Time::ZERO, 1_795_781_093_000);
        let model = RouterModel::new(n_backends, cfg.breaker);
        Sim {
            rng,
            base,
            tag,
            params,
            scenario,
            d,
            now: 0,
            agenda: BinaryHeap::new(),
            seq: 0,
            conns: BTreeMap::new(),
            next_conn: 1,
            gens: BTreeMap::new(),
            specs: Vec::new(),
            reqs: Vec::new(),
            req_by_id: HashMap::new(),
            next_bad: 0,
            backends,
            model,
            horizon: 0,
            clients_planned: 0,
            bound: false,
            stop_accepting: false,
            shutdown_at: None,
            exited: None,
            served_records: 0,
            queue_full_records: 0,
            requests_written: 0,
            attached: 0,
            live_gens: 0,
            open_inference: 0,
            steps: 0,
            trace: Trace::default(),
            cov: Coverage::default(),
            largest_read: 0,
            next_http_id: 1,
            cfg,
        }
    }

    fn stats(&self) -> RunStats {
        RunStats {
            requests: self.requests_written,
            steps: self.steps,
            sim_ms: self.now,
            coverage: self.cov,
        }
    }

    fn describe(&self) -> String {
        let c = &self.cfg;
        format!(
            "backends={:?} active_permits={} queue_depth={} max_frame_bytes={} write_timeout={:?} \
             read_timeout={:?} max_connections={} drain_timeout={:?} stats_interval={:?} \
             admin_lag_limit={} max_admin_subscribers={} auth_timeout={:?} \
             breaker=({} in {:?}, cooldown {:?}) ready_timeout={:?} api_key={} \
             timings={} clients={} horizon={}ms scenario={:?} tag={}",
            c.backends,
            c.active_permits,
            c.queue_depth,
            c.max_frame_bytes,
            c.write_timeout,
            c.read_timeout,
            c.max_connections,
            c.drain_timeout,
            c.stats_interval,
            c.admin_lag_limit,
            c.max_admin_subscribers,
            c.auth_timeout,
            c.breaker.failure_threshold,
            c.breaker.failure_window,
            c.breaker.cooldown,
            c.ready_timeout,
            c.api_key.is_some(),
            c.timings,
            self.clients_planned,
            self.horizon,
            self.scenario,
            self.tag
        )
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        let (class, id) = ev.key();
        self.seq += 1;
        self.agenda.push(Reverse((at, class, id, self.seq, ev)));
    }

    fn note(&mut self, what: &'static str, subject: String) {
        self.trace.push(self.now, Dir::Sim, what, subject);
    }

    // ---- the loop ------------------------------------------------------------------

    fn setup(&mut self) {
        let rng = &mut self.rng;
        // Backends load, each through a few phases.
        let mut load_end = 0;
        let mut loads = Vec::new();
        for b in 0..self.backends.len() {
            let start = rng.below(300);
            let per_phase = self.backends[b].per_phase_ms;
            let mut end = start + per_phase * u64::from(self.backends[b].phases + 1);
            if self.scenario.slow_load && b == 0 {
                end += 5_000;
            }
            load_end = load_end.max(end);
            loads.push((b, start, per_phase));
        }
        self.horizon = load_end + rng.range(1_000, self.params.max_horizon_ms);
        let horizon = self.horizon;
        let clients = rng.range(1, self.params.max_clients);
        let admins = rng.range(0, self.params.max_admins);
        let mut plan = Vec::new();
        // Arrivals, some in bursts at the same instant.
        let mut k = 0;
        while k < clients {
            let at = rng.range(load_end + 1, horizon);
            let burst = if rng.chance(1, 5) { rng.range(2, 6) } else { 1 };
            for _ in 0..burst.min(clients - k) {
                plan.push((at, Ev::NewClient(k)));
                k += 1;
            }
        }
        for a in 0..admins {
            plan.push((rng.range(0, horizon), Ev::NewAdmin(a)));
        }
        for b in 0..self.backends.len() {
            for _ in 0..rng.below(4) {
                plan.push((rng.range(load_end, horizon), Ev::BackendFlap(b)));
            }
            for _ in 0..rng.below(3) {
                let s = rng.range(load_end, horizon);
                let len = rng.range(100, 10_000);
                self.backends[b].down.push((s, s + len));
            }
        }
        if rng.chance(1, 3) {
            for _ in 0..rng.range(1, 2) {
                plan.push((rng.range(0, horizon), Ev::ClockJump(rng.range(1_000, 60_000))));
            }
        }
        if rng.chance(1, 2) {
            plan.push((rng.range(200, horizon + 5_000), Ev::Shutdown));
        }
        plan.push((horizon + 30_000, Ev::ForceHangups));
        self.clients_planned = clients;
        for (b, start, per_phase) in loads {
            self.schedule(start, Ev::BackendLoad(b, 0));
            let _ = per_phase;
        }
        for (at, ev) in plan {
            self.schedule(at, ev);
        }
    }

    fn run(&mut self) {
        self.setup();
        loop {
            if self.exited.is_some() {
                break;
            }
            self.steps += 1;
            assert!(
                self.steps <= self.params.max_steps,
                "the run did not end after {} steps (livelock?)",
                self.params.max_steps
            );
            let next_ev = self.agenda.peek().map(|Reverse(k)| k.0);
            let tmo = self.d.poll_timeout().map(|t| t.as_nanos().div_ceil(1_000_000));
            match (next_ev, tmo) {
                (None, None) => break,
                (ev, Some(t)) if ev.is_none_or(|e| t <= e) => {
                    self.now = self.now.max(t);
                    self.feed(Input::Timeout);
                    if let Some(s) = self.shutdown_at {
                        let deadline =
                            s + self.cfg.drain_timeout.as_millis() as u64 + DRAIN_GRACE_MS;
                        assert!(
                            self.now < deadline || self.exited.is_some(),
                            "no Exit by the drain deadline plus grace ({deadline} ms; shutdown at {s} ms)"
                        );
                    }
                }
                _ => {
                    let Some(Reverse((t, _, _, _, ev))) = self.agenda.pop() else { break };
                    self.now = self.now.max(t);
                    self.on_event(ev);
                }
            }
        }
        self.final_checks();
    }

    fn on_event(&mut self, ev: Ev) {
        match ev {
            Ev::BackendLoad(b, step) => self.backend_load(b, step),
            Ev::BackendFlap(b) => self.backend_flap(b),
            Ev::BackendBack(b) => {
                if self.exited.is_none() && !self.backends[b].ready {
                    self.backends[b].ready = true;
                    self.model.set_ready(BackendId(b), true);
                    self.feed(Input::BackendReadiness { backend: BackendId(b), ready: true });
                }
            }
            Ev::Shutdown => self.shutdown(),
            Ev::ClockJump(d) => {
                self.now += d;
                self.cov.clock_jumps += 1;
                self.note("clock jump", format!("+{d} ms"));
            }
            Ev::NewAdmin(_) => self.spawn_admin(),
            Ev::NewClient(_) => self.spawn_client(),
            Ev::ClientWake(c, token) => {
                if self.conns.get(&c).is_some_and(|conn| conn.wake_token == token) {
                    self.client_step(c);
                }
            }
            Ev::ShellRead(c) => self.shell_read(c),
            Ev::ShellFlush(c, token) => self.shell_flush(c, token),
            Ev::ShellHangup(c) => {
                if self.conns.get(&c).is_some_and(|conn| !conn.closed) {
                    self.feed(Input::HungUp { conn: ConnId(c) });
                }
            }
            Ev::EngineWake(g) => self.engine_wake(g),
            Ev::ForceHangups => self.force_hangups(),
            Ev::FinalCheck => self.final_check(),
        }
    }

    /// Feeds one input, drains every output, checks the invariants.
    fn feed(&mut self, input: Input) {
        self.trace_input(&input);
        if let Input::Received { bytes, .. } = &input {
            self.largest_read = self.largest_read.max(bytes.len());
        }
        self.d.handle(Time::from_millis(self.now), input);
        while let Some(o) = self.d.poll_output() {
            assert!(self.exited.is_none(), "output after Exit: {}", short_output(&o));
            self.on_output(o);
        }
        self.check_step();
    }

    // ---- invariants after every step -----------------------------------------------

    fn check_step(&mut self) {
        let s = self.d.stats();
        let cfg = &self.cfg;
        let held_cap = cfg.max_frame_bytes.max(MAX_AUTH_LINE_BYTES) + 1 + self.largest_read;
        assert!(
            self.d.max_input_held() <= held_cap,
            "a connection holds {} input bytes, more than a line cap plus one read ({held_cap})",
            self.d.max_input_held()
        );
        assert!(
            s.queued <= cfg.queue_depth,
            "queue holds {} requests, more than queue_depth {}",
            s.queued,
            cfg.queue_depth
        );
        assert!(
            s.active <= cfg.active_permits,
            "{} requests generating, more than active_permits {}",
            s.active,
            cfg.active_permits
        );
        assert_eq!(
            s.served, self.served_records,
            "stats.served disagrees with request_done records"
        );
        assert_eq!(
            s.rejected, self.queue_full_records,
            "stats.rejected disagrees with queue_full records"
        );
        if let Some((_, _)) = &self.exited {
            assert_eq!(self.d.generations_running(), 0, "generations left after Exit");
            assert_eq!(self.d.connections_open(), 0, "connections left open after Exit");
            if let Some(c) = self.conns.iter().find(|(_, c)| !c.closed) {
                panic!("connection c{} never got a Close before Exit", c.0);
            }
            return;
        }
        assert_eq!(
            s.active as usize, self.attached,
            "admission holds {} generating places but {} generations are live for a client",
            s.active, self.attached
        );
        if self.shutdown_at.is_none() {
            assert_eq!(
                self.d.generations_running(),
                self.live_gens,
                "daemon tracks {} generations, engines still owe an end for {}",
                self.d.generations_running(),
                self.live_gens
            );
        } else {
            assert!(
                self.d.generations_running() <= self.live_gens,
                "daemon tracks unknown generations"
            );
        }
        assert_eq!(
            s.connections as usize, self.open_inference,
            "stats.connections disagrees with the open inference connections"
        );
    }

    fn final_check(&mut self) {
        if self.exited.is_some() {
            return;
        }
        if self.shutdown_at.is_none() {
            let s = self.d.stats();
            assert_eq!(
                self.open_inference, 0,
                "inference connections still open after every client left"
            );
            assert_eq!(
                (s.active, s.queued, s.connections),
                (0, 0, 0),
                "admission places not returned after every client left and engines answered"
            );
            assert_eq!(self.attached, 0);
            self.note("quiescent", "all places returned; shutting down".into());
            self.shutdown();
        }
    }

    fn final_checks(&mut self) {
        if self.shutdown_at.is_some()
            || self.scenario.load_fail.is_some()
            || self.scenario.slow_load
        {
            assert!(self.exited.is_some(), "the daemon never exited");
        }
        // Every started request ended: a terminal frame, a cancellation record, or a
        // finished record whose frame went down with its dropped connection.
        for (n, r) in self.reqs.iter().enumerate() {
            if r.generation.is_some() {
                assert!(
                    r.terminal || r.cancel_record || r.lost_ok,
                    "request {n} (id {:?}) started but got neither a terminal frame nor a cancellation record",
                    self.specs[n].id
                );
            }
        }
        self.check_fifo();
    }

    /// Served in arrival order: no request starts while one admitted earlier still waits.
    fn check_fifo(&mut self) {
        let known: Vec<(usize, u64, u64, Option<u64>)> = self
            .reqs
            .iter()
            .enumerate()
            .filter_map(|(n, r)| {
                let a = r.admitted_at?;
                let end = r.started_at.or(r.queued_cancel_at)?;
                Some((n, a, end, r.started_at))
            })
            .collect();
        for &(na, aa, wait_end, _) in &known {
            if wait_end > aa {
                self.cov.fifo_pairs += known.len() as u64;
            }
            for &(nb, ab, _, sb) in &known {
                if let Some(sb) = sb
                    && ab > aa
                    && sb < wait_end
                {
                    panic!(
                        "FIFO broken: request {nb} (admitted {ab} ms) started at {sb} ms while request {na} \
                         (admitted earlier, {aa} ms) still waited until {wait_end} ms"
                    );
                }
            }
        }
    }

    // ---- backends, shutdown --------------------------------------------------------

    fn backend_load(&mut self, b: usize, step: u32) {
        if self.exited.is_some() {
            return;
        }
        if self.scenario.load_fail == Some((b, step)) {
            let error = EngineError::internal("simulated load failure: bad magic");
            self.feed(Input::BackendFailed { backend: BackendId(b), error });
            return;
        }
        if step < self.backends[b].phases {
            let phase = match self.rng.below(4) {
                0 => LoadPhase::CheckingLocal { path: "/models/m.gguf".into() },
                1 => LoadPhase::Download {
                    downloaded_bytes: self.rng.below(1 << 30),
                    total_bytes: if self.rng.chance(1, 2) { None } else { Some(1 << 30) },
                    source_url: "https://example.invalid/m.gguf".into(),
                },
                2 => LoadPhase::Mmap { path: "/models/m.gguf".into() },
                _ => LoadPhase::KvCache { n_ctx: 4096 },
            };
            self.feed(Input::BackendPhase { backend: BackendId(b), phase });
            let mut next = self.now + self.backends[b].per_phase_ms;
            if self.scenario.slow_load && b == 0 {
                next += 5_000;
            }
            self.schedule(next, Ev::BackendLoad(b, step + 1));
        } else {
            let caps = Capabilities::text_cpu();
            self.backends[b].loaded = true;
            self.backends[b].ready = true;
            self.model.set_ready(BackendId(b), true);
            self.feed(Input::BackendLoaded { backend: BackendId(b), capabilities: caps });
        }
    }

    fn backend_flap(&mut self, b: usize) {
        if self.exited.is_some() || !self.bound {
            return;
        }
        match self.rng.below(10) {
            0 => {
                let phase = LoadPhase::Verify { path: "/models/m.gguf".into() };
                self.feed(Input::BackendPhase { backend: BackendId(b), phase });
            }
            1 => {
                self.backends[b].ready = false;
                self.model.set_ready(BackendId(b), false);
                let error = EngineError::unavailable("simulated crash");
                self.feed(Input::BackendFailed { backend: BackendId(b), error });
                let back = self.now + self.rng.range(50, 8_000);
                self.schedule(back, Ev::BackendBack(b));
            }
            _ => {
                let ready = !self.backends[b].ready;
                self.backends[b].ready = ready;
                self.model.set_ready(BackendId(b), ready);
                self.feed(Input::BackendReadiness { backend: BackendId(b), ready });
                if !ready && self.rng.chance(4, 5) {
                    let back = self.now + self.rng.range(50, 8_000);
                    self.schedule(back, Ev::BackendBack(b));
                }
            }
        }
    }

    fn shutdown(&mut self) {
        if self.exited.is_some() || self.shutdown_at.is_some() {
            return;
        }
        self.shutdown_at = Some(self.now);
        self.feed(Input::Shutdown);
    }

    fn force_hangups(&mut self) {
        if self.exited.is_some() {
            return;
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for c in ids {
            let conn = &self.conns[&c];
            if conn.closed || conn.kind == Kind::Admin || conn.hung_up {
                continue;
            }
            assert!(
                !(conn.must_close && conn.in_flight.is_none()),
                "c{c}: the daemon sent an error that closes the connection, flushed it, but never closed"
            );
            self.client_hang_up(c);
        }
        // Measured from now: a clock jump may have made this late.
        self.schedule(self.now + 5_000, Ev::FinalCheck);
    }

    // ---- clients -------------------------------------------------------------------

    fn spawn_client(&mut self) {
        if !self.bound || self.stop_accepting || self.exited.is_some() {
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        let first_new = self.specs.len();
        let read_timeout_ms = self.cfg.read_timeout.as_millis() as u64;
        // HTTP clients draw from their own generator, so NDJSON runs keep their shape.
        let mut hrng = Rng::new(mix(self.base ^ 0x4854_5450, id));
        let http = hrng.chance(1, 4);
        let (script, tcp) = if http {
            let mut ctx = Ctx {
                tag: self.tag,
                cap: self.cfg.max_frame_bytes,
                read_timeout_ms: if read_timeout_ms == 0 { 5_000 } else { read_timeout_ms },
                api_key: self.cfg.api_key.as_deref(),
                next_bad: &mut self.next_bad,
                reqs: &mut self.specs,
            };
            (scripts::http_client_script(&mut hrng, &mut ctx), true)
        } else {
            let mut ctx = Ctx {
                tag: self.tag,
                cap: self.cfg.max_frame_bytes,
                read_timeout_ms: if read_timeout_ms == 0 { 5_000 } else { read_timeout_ms },
                api_key: self.cfg.api_key.as_deref(),
                next_bad: &mut self.next_bad,
                reqs: &mut self.specs,
            };
            scripts::client_script(&mut self.rng, &mut ctx)
        };
        let kind = if http { Kind::Http } else { Kind::Inference };
        for n in first_new..self.specs.len() {
            let prev = self.req_by_id.insert(self.specs[n].id.clone(), n);
            assert!(prev.is_none(), "sim bug: duplicate request id");
            self.reqs.push(ReqState { conn: id, ..ReqState::default() });
        }
        let crng = Rng::new(mix(self.base, id));
        self.conns.insert(id, Conn::new(kind, crng, script));
        self.open_inference += 1;
        let transport = if tcp { Transport::Tcp } else { Transport::Unix };
        let peer = Peer {
            transport,
            addr: format!("sim-client-{id}"),
            uid: Some(1000),
            pid: Some(id as u32),
        };
        let listener = if http { ListenerKind::Http } else { ListenerKind::Inference };
        self.feed(Input::Accepted { conn: ConnId(id), listener, peer });
        if let Some(c) = self.conns.get_mut(&id) {
            c.fresh = false;
        }
        if !self.conns[&id].closed {
            self.wake(id, self.now);
        }
    }

    fn spawn_admin(&mut self) {
        if self.stop_accepting || self.exited.is_some() {
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        let mut crng = Rng::new(mix(self.base, id));
        let mut script = Vec::new();
        match crng.below(4) {
            0 => script.push(Action::Stall(None)),
            1 => script.push(Action::Stall(Some(crng.range(100, 20_000)))),
            _ => {}
        }
        if crng.chance(1, 3) {
            script.push(Action::Sleep(crng.range(10, 20_000)));
            script.push(Action::HangUp);
        }
        script.push(Action::Idle);
        self.conns.insert(id, Conn::new(Kind::Admin, crng, script));
        let peer = Peer {
            transport: Transport::Unix,
            addr: format!("sim-admin-{id}"),
            uid: None,
            pid: None,
        };
        self.feed(Input::Accepted { conn: ConnId(id), listener: ListenerKind::Admin, peer });
        if let Some(c) = self.conns.get_mut(&id) {
            c.fresh = false;
        }
        if !self.conns[&id].closed {
            self.wake(id, self.now);
        }
    }

    /// Schedules the client's next step, superseding any earlier scheduled one.
    fn wake(&mut self, c: u64, at: u64) {
        let Some(conn) = self.conns.get_mut(&c) else { return };
        conn.wake_token += 1;
        let token = conn.wake_token;
        self.schedule(at, Ev::ClientWake(c, token));
    }

    fn client_step(&mut self, c: u64) {
        loop {
            let now = self.now;
            let Some(conn) = self.conns.get_mut(&c) else { return };
            if conn.closed || conn.hung_up {
                return;
            }
            if let Some(w) = &mut conn.writing {
                let remaining = w.bytes.len() - w.pos;
                let n = conn.rng.range_usize(1, w.chunk_max.min(remaining).max(1)).min(remaining);
                conn.inbound.extend(&w.bytes[w.pos..w.pos + n]);
                w.pos += n;
                conn.written += n;
                let mut done_lines = Vec::new();
                while w.marks.front().is_some_and(|(off, _)| *off <= w.pos) {
                    if let Some((_, e)) = w.marks.pop_front() {
                        done_lines.push(e);
                    }
                }
                let more = w.pos < w.bytes.len();
                let gap = w.gap_ms;
                if !more {
                    conn.writing = None;
                }
                let next_at = now + if gap == 0 { 0 } else { conn.rng.range(0, gap) };
                for e in done_lines {
                    if e.answered() {
                        conn.expected_terminals += 1;
                    }
                    if let Expect::Request(n) = e {
                        self.reqs[n].written = true;
                        self.requests_written += 1;
                    }
                    conn.expect.push_back(e);
                }
                self.notify_read(c);
                if more || gap > 0 {
                    self.wake(c, next_at);
                    return;
                }
                continue;
            }
            match conn.script.pop_front() {
                None => return,
                Some(Action::Write { bytes, marks, chunk_max, gap_ms }) => {
                    if conn.kind == Kind::Http {
                        for (off, e) in &marks {
                            if let Expect::Request(n) = e {
                                conn.chat_ends.push_back((conn.written + off, *n));
                            }
                        }
                    }
                    conn.writing =
                        Some(Writing { bytes, pos: 0, marks: marks.into(), chunk_max, gap_ms });
                }
                Some(Action::Await { patience_ms }) => {
                    if conn.delivered_terminals >= conn.expected_terminals {
                        conn.await_deadline = None;
                        conn.waiting = false;
                        continue;
                    }
                    let deadline = *conn
                        .await_deadline
                        .get_or_insert_with(|| patience_ms.map_or(u64::MAX, |p| now + p));
                    if now >= deadline {
                        self.note("client gives up", format!("c{c}"));
                        self.client_hang_up(c);
                        return;
                    }
                    conn.script.push_front(Action::Await { patience_ms });
                    conn.waiting = true;
                    if deadline != u64::MAX {
                        self.wake(c, deadline);
                    }
                    return;
                }
                Some(Action::Sleep(ms)) => {
                    self.wake(c, now + ms);
                    return;
                }
                Some(Action::HalfClose) => {
                    conn.eof_written = true;
                    self.note("client half-closes", format!("c{c}"));
                    self.notify_read(c);
                }
                Some(Action::HangUp) => {
                    self.client_hang_up(c);
                    return;
                }
                Some(Action::Stall(d)) => {
                    conn.stall_until = d.map_or(u64::MAX, |d| now + d);
                    self.note("client stalls reads", format!("c{c} for {d:?} ms"));
                }
                Some(Action::Idle) => {
                    conn.script.push_front(Action::Idle);
                    return;
                }
            }
        }
    }

    fn client_hang_up(&mut self, c: u64) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else { return };
        if conn.closed || conn.hung_up {
            return;
        }
        conn.hung_up = true;
        conn.eof_written = true;
        conn.script.clear();
        conn.writing = None;
        let at = now + conn.rng.below(3);
        self.note("client hangs up", format!("c{c}"));
        self.schedule(at, Ev::ShellHangup(c));
    }

    // ---- the shell's side ----------------------------------------------------------

    fn notify_read(&mut self, c: u64) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else { return };
        if conn.closed || !conn.credit || (conn.inbound.is_empty() && !conn.eof_written) {
            return;
        }
        let at = now + if conn.rng.chance(7, 10) { 0 } else { conn.rng.range(1, 3) };
        self.schedule(at, Ev::ShellRead(c));
    }

    fn shell_read(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else { return };
        if conn.closed || !conn.credit {
            return;
        }
        if !conn.inbound.is_empty() {
            let len = conn.inbound.len();
            let n =
                if conn.rng.chance(7, 10) { len.min(8192) } else { conn.rng.range_usize(1, len) };
            let bytes: Vec<u8> = conn.inbound.drain(..n).collect();
            conn.credit = false;
            conn.fed += n;
            // The daemon names an HTTP chat request when its body is complete (the
            // client never sends one before the last is answered): learn the name now,
            // before the daemon's records mention it.
            while conn.chat_ends.front().is_some_and(|&(end, _)| end <= conn.fed) {
                let Some((_, req)) = conn.chat_ends.pop_front() else { break };
                let rid = format!("{:x}", self.next_http_id);
                self.next_http_id += 1;
                self.specs[req].id = rid.clone();
                let prev = self.req_by_id.insert(rid, req);
                assert!(prev.is_none(), "sim bug: duplicate HTTP request id");
            }
            self.feed(Input::Received { conn: ConnId(c), bytes });
        } else if conn.eof_written {
            conn.credit = false;
            self.feed(Input::ReadClosed { conn: ConnId(c) });
        }
    }

    fn shell_flush(&mut self, c: u64, token: u64) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else { return };
        if conn.closed || conn.flush_token != token || conn.hung_up {
            return;
        }
        let Some(terminals) = conn.in_flight else { return };
        if conn.stall_until > now {
            if conn.stall_until != u64::MAX {
                let at = conn.stall_until;
                self.schedule(at, Ev::ShellFlush(c, token));
            }
            return;
        }
        conn.in_flight = None;
        conn.delivered_terminals += terminals;
        let waiting = conn.waiting;
        self.feed(Input::Flushed { conn: ConnId(c) });
        if waiting {
            self.wake(c, self.now);
        }
    }

    // ---- outputs -------------------------------------------------------------------

    fn on_output(&mut self, o: Output) {
        match o {
            Output::Send { conn, bytes } => self.on_send(conn.0, bytes),
            Output::Read { conn } => self.on_read(conn.0),
            Output::Close { conn } => self.on_close(conn.0),
            Output::Start { generation, backend, request } => {
                self.on_start(generation.0, backend, request)
            }
            Output::Cancel { generation } => self.on_cancel(generation.0),
            Output::Activity(line) => self.on_activity(&line),
            Output::BindInference => {
                self.trace.push(self.now, Dir::Out, "BindInference", String::new());
                assert!(!self.bound, "BindInference twice");
                assert!(
                    self.backends.iter().all(|b| b.loaded),
                    "BindInference before every backend loaded"
                );
                self.bound = true;
            }
            Output::StopAccepting => {
                self.trace.push(self.now, Dir::Out, "StopAccepting", String::new());
                assert!(self.shutdown_at.is_some(), "StopAccepting without a shutdown");
                assert!(!self.stop_accepting, "StopAccepting twice");
                self.stop_accepting = true;
            }
            Output::Exit { reason } => {
                // As the shells report it: status 0 and no text when orderly, else 1.
                let (code, message) = match reason.is_orderly() {
                    true => (0, String::new()),
                    false => (1, reason.to_string()),
                };
                self.trace.push(self.now, Dir::Out, "Exit", format!("code={code} {message:?}"));
                if self.shutdown_at.is_some() {
                    assert_eq!(code, 0, "exit after a shutdown must be 0: {message}");
                } else {
                    assert!(
                        self.scenario.load_fail.is_some() || self.scenario.slow_load,
                        "Exit without a shutdown or a load failure: code {code} {message:?}"
                    );
                    assert_eq!(code, 1, "a failed start exits 1: {message}");
                }
                if code == 0 {
                    self.cov.exit0 += 1;
                } else {
                    self.cov.exit1 += 1;
                }
                self.exited = Some((code, message));
            }
        }
    }

    fn on_read(&mut self, c: u64) {
        self.trace.push(self.now, Dir::Out, "Read", format!("c{c}"));
        let conn = self.conns.get_mut(&c).unwrap_or_else(|| panic!("Read for unknown c{c}"));
        assert!(!conn.closed, "Read for c{c} after its Close");
        assert_ne!(conn.kind, Kind::Admin, "Read on admin connection c{c}");
        assert!(!conn.credit, "a second Read credit for c{c} before the first was used");
        conn.credit = true;
        self.notify_read(c);
    }

    fn on_close(&mut self, c: u64) {
        self.trace.push(self.now, Dir::Out, "Close", format!("c{c}"));
        let conn = self.conns.get_mut(&c).unwrap_or_else(|| panic!("Close for unknown c{c}"));
        assert!(!conn.closed, "c{c} closed twice");
        conn.closed = true;
        conn.credit = false;
        let exiting = self.shutdown_at.is_some();
        if conn.fresh {
            self.cov.refused += 1;
        } else if conn.hung_up {
            self.cov.client_hangups += 1;
        } else if conn.kind == Kind::Admin && !exiting {
            self.cov.admin_drops += 1;
        } else if !conn.must_close {
            self.cov.daemon_closes += 1;
        }
        if conn.kind == Kind::Admin {
            // Spec §4-§5: a subscriber that keeps up hears `draining` before the daemon
            // closes it on the way out, whether or not anything was in flight.
            if let Some(s) = self.shutdown_at {
                let grace_end = s + self.cfg.drain_timeout.as_millis() as u64 + DRAIN_GRACE_MS;
                assert!(
                    conn.hung_up
                        || conn.saw_draining
                        || conn.in_flight.is_some()
                        || self.now >= grace_end,
                    "admin c{c} closed during shutdown without the draining status"
                );
            }
            return;
        }
        self.open_inference -= 1;
        let in_flight = conn.in_flight.is_some();
        for e in &conn.expect {
            let Expect::Request(n) = e else { continue };
            let r = &mut self.reqs[*n];
            if r.terminal || r.generation.is_none() {
                continue;
            }
            // Cancelled: its record waits for the engine's account.
            if r.cancel_record || r.generation.is_some_and(|g| self.gens[&g].cancelled_at.is_some())
            {
                continue;
            }
            if r.end_record && in_flight {
                r.lost_ok = true;
                self.cov.lost_terminal += 1;
                continue;
            }
            panic!(
                "c{c} closed while request {n} (id {:?}) had started, with neither a terminal frame \
                 nor a cancellation record",
                self.specs[*n].id
            );
        }
    }

    fn on_start(
        &mut self,
        g: u64,
        backend: BackendId,
        request: inferd_core::engine::GenerateRequest,
    ) {
        let now = self.now;
        let prefix = format!("PROMPT-{}-", self.tag);
        let n = request
            .messages
            .last()
            .and_then(|m| {
                let i = m.content.find(&prefix)? + prefix.len();
                let digits: String =
                    m.content[i..].chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse::<usize>().ok()
            })
            .unwrap_or_else(|| panic!("Start g{g} for a request the simulation never sent"));
        self.trace.gen_of(g, self.reqs[n].conn);
        self.trace.push(now, Dir::Out, "Start", format!("g{g} backend={backend} request={n}"));
        assert!(!self.gens.contains_key(&g), "generation g{g} started twice");
        assert!(backend.0 < self.backends.len(), "Start on unknown backend {backend}");
        assert!(self.shutdown_at.is_none(), "Start of request {n} after the shutdown");
        assert!(
            request == self.specs[n].params,
            "Start for request {n} does not carry what the client sent:\n  sent {:?}\n  got  {:?}",
            self.specs[n].params,
            request
        );
        let r = &self.reqs[n];
        assert!(r.written, "request {n} started before its line was complete");
        assert!(r.generation.is_none(), "request {n} started twice");
        let c = r.conn;
        let conn = &self.conns[&c];
        assert!(!conn.closed, "request {n} started after its connection c{c} closed");
        // One request at a time per connection: every earlier request has ended.
        let mut found = false;
        for e in &conn.expect {
            match e {
                Expect::Request(m) if *m == n => {
                    found = true;
                    break;
                }
                Expect::Request(m) => {
                    let rm = &self.reqs[*m];
                    assert!(
                        rm.terminal || rm.end_record || rm.cancel_record,
                        "request {n} started on c{c} while request {m} before it had not ended"
                    );
                }
                _ => {}
            }
        }
        assert!(found, "request {n} started but c{c} has no such line outstanding");
        // The reference router must pick the same backend.
        let route = self.model.route(Time::from_millis(now)).unwrap_or_else(|| {
            panic!(
                "Start g{g} on backend {backend}, but the reference router has no backend to offer"
            )
        });
        assert_eq!(
            route.backend, backend,
            "Start g{g} on backend {backend}, but the reference router picks backend {}",
            route.backend
        );
        if route.trial {
            self.cov.trials += 1;
            let other = self.gens.iter().find(|(_, x)| {
                x.backend == backend && x.route.trial && x.attached && x.end.is_none()
            });
            assert!(
                other.is_none(),
                "a second half-open trial on backend {backend} while g{} is out",
                other.map_or(0, |o| *o.0)
            );
        }
        let r = &mut self.reqs[n];
        r.generation = Some(g);
        r.started_at = Some(now);
        let mut grng = Rng::new(mix(self.base ^ 0xE17E, g));
        let down = self.backends[backend.0].is_down(now);
        let script = scripts::engine_script(&mut grng, &request, down, g);
        self.gens.insert(
            g,
            Gen {
                req: n,
                backend,
                route,
                rng: grng,
                script,
                bytes: Vec::new(),
                token_events: 0,
                first_token_at: None,
                started_at: now,
                ended_at: None,
                end: None,
                attached: true,
                cancelled_at: None,
            },
        );
        self.attached += 1;
        self.live_gens += 1;
        self.schedule_engine(g);
    }

    fn schedule_engine(&mut self, g: u64) {
        let Some(gen_) = self.gens.get(&g) else { return };
        if let Some((delay, _)) = gen_.script.front() {
            let at = self.now + delay;
            self.schedule(at, Ev::EngineWake(g));
        }
    }

    fn on_cancel(&mut self, g: u64) {
        let now = self.now;
        self.trace.push(now, Dir::Out, "Cancel", format!("g{g}"));
        let shutdown = self.shutdown_at.is_some();
        let gen_ = self.gens.get_mut(&g).unwrap_or_else(|| panic!("Cancel for unknown g{g}"));
        self.trace.push(now, Dir::Sim, "engine", format!("g{g} (request {}) cancelled", gen_.req));
        assert!(gen_.end.is_none(), "Cancel for g{g} after its engine reported the end");
        if !gen_.attached {
            assert!(shutdown, "a second Cancel for g{g}");
            return;
        }
        gen_.attached = false;
        gen_.cancelled_at = Some(now);
        self.cov.cancels += 1;
        let route = gen_.route;
        let tokens = gen_.token_events;
        gen_.script = scripts::after_cancel(&mut gen_.rng, tokens);
        self.attached -= 1;
        self.model.report(route, Outcome::Neutral, Time::from_millis(now));
        self.schedule_engine(g);
    }

    fn engine_wake(&mut self, g: u64) {
        if self.exited.is_some() {
            return;
        }
        let now = self.now;
        let Some(gen_) = self.gens.get_mut(&g) else { return };
        if gen_.end.is_some() {
            return;
        }
        let Some((_, step)) = gen_.script.pop_front() else { return };
        let event = match step {
            Step::Hang => {
                gen_.script.clear();
                return;
            }
            Step::Token(b) => {
                if gen_.attached {
                    gen_.bytes.extend_from_slice(&b);
                    gen_.token_events += 1;
                    gen_.first_token_at.get_or_insert(now);
                }
                EngineEvent::Token(b)
            }
            Step::Done(c) => {
                gen_.end = Some(GenEnd::Done(c));
                EngineEvent::Done(c)
            }
            Step::Fail(e) => {
                gen_.end = Some(GenEnd::Failed(e.kind));
                EngineEvent::Failed(e)
            }
        };
        if gen_.end.is_some() {
            gen_.ended_at = Some(now);
            self.live_gens -= 1;
            if gen_.attached {
                gen_.attached = false;
                self.attached -= 1;
                let outcome = match &event {
                    EngineEvent::Failed(e) if e.kind == EngineErrorKind::InvalidRequest => {
                        Outcome::Neutral
                    }
                    EngineEvent::Failed(EngineError { incident: Some(id), .. }) => {
                        self.cov.shared_failures += 1;
                        Outcome::SharedFailure(*id)
                    }
                    EngineEvent::Failed(_) => Outcome::Failure,
                    _ => Outcome::Success,
                };
                let route = gen_.route;
                if let EngineEvent::Failed(EngineError { retry_after: Some(after), .. }) = &event {
                    self.cov.retry_after_hints += 1;
                    let not_before = Time::from_millis(now) + *after;
                    self.model.retry_after(route.backend, not_before);
                }
                self.model.report(route, outcome, Time::from_millis(now));
            }
        }
        self.feed(Input::Engine { generation: GenId(g), event });
        self.schedule_engine(g);
    }

    fn on_send(&mut self, c: u64, bytes: Vec<u8>) {
        let now = self.now;
        self.trace.push_bytes(now, Dir::Out, "Send", format!("c{c}"), &bytes);
        let cap = self.cfg.max_frame_bytes;
        let conn = self.conns.get(&c).unwrap_or_else(|| panic!("Send to unknown c{c}"));
        assert!(!conn.closed, "Send on c{c} after its Close");
        assert!(conn.in_flight.is_none(), "a second Send on c{c} while one is in flight");
        assert!(!bytes.is_empty(), "empty Send on c{c}");
        let kind = conn.kind;
        if kind == Kind::Http {
            let terminals = self.on_http_bytes(c, &bytes);
            self.sent(c, terminals);
            return;
        }
        assert_eq!(bytes.last(), Some(&b'\n'), "Send on c{c} ends inside a frame");
        let mut terminals = 0;
        for line in bytes[..bytes.len() - 1].split(|&b| b == b'\n') {
            assert!(
                line.len() <= cap,
                "c{c}: a frame of {} bytes exceeds max_frame_bytes {cap}: {}",
                line.len(),
                lossy(line)
            );
            assert!(!line.is_empty(), "c{c}: the daemon wrote an empty line");
            match kind {
                Kind::Inference => {
                    if self.check_inference_frame(c, line) {
                        terminals += 1;
                    }
                }
                Kind::Http => unreachable!("HTTP sends are parsed above"),
                Kind::Admin => {
                    self.check_admin_frame(c, line);
                    if line.windows(10).any(|w| w == b"\"draining\"")
                        && let Some(conn) = self.conns.get_mut(&c)
                    {
                        conn.saw_draining = true;
                    }
                }
            }
        }
        self.sent(c, terminals);
    }

    /// A `Send` carrying `terminals` answers is in flight: schedule its delivery.
    fn sent(&mut self, c: u64, terminals: u64) {
        let now = self.now;
        let conn = self.conns.get_mut(&c).unwrap_or_else(|| panic!("c{c} vanished"));
        conn.in_flight = Some(terminals);
        conn.flush_token += 1;
        let token = conn.flush_token;
        if conn.stall_until == u64::MAX {
            return;
        }
        let delay = match conn.rng.below(20) {
            0..=11 => 0,
            12..=18 => conn.rng.range(1, 5),
            _ => conn.rng.range(50, 500),
        };
        let at = now.max(conn.stall_until) + delay;
        self.schedule(at, Ev::ShellFlush(c, token));
    }

    fn check_inference_frame(&mut self, c: u64, line: &[u8]) -> bool {
        let v: Value = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("c{c}: frame is not JSON ({e}): {}", lossy(line)));
        let obj = v.as_object().unwrap_or_else(|| panic!("c{c}: frame is not an object"));
        let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
        let id = obj
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("c{c}: frame without a string id: {}", lossy(line)));
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let allowed: &[&str] = match ty {
            "token" => &["content", "id", "type"],
            "done" => &["backend", "content", "id", "stop_reason", "timings", "type", "usage"],
            "error" => &["code", "id", "message", "type"],
            _ => panic!("c{c}: frame type {ty:?} on an inference connection: {}", lossy(line)),
        };
        for k in &keys {
            assert!(allowed.contains(k), "c{c}: unexpected field {k:?} in {ty} frame");
        }
        let str_field = |k: &str| -> &str {
            obj.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("c{c}: {ty} frame without string {k:?}: {}", lossy(line)))
        };
        let conn = self.conns.get_mut(&c).unwrap_or_else(|| panic!("c{c} vanished"));
        assert!(
            !conn.must_close,
            "c{c}: a frame after an error that closes the connection: {}",
            lossy(line)
        );
        let Some(exp) = conn.expect.front().cloned() else {
            panic!("c{c}: a frame with no request outstanding: {}", lossy(line))
        };
        match (ty, exp) {
            (_, Expect::AuthBad) => {
                panic!("c{c}: a frame on a connection whose authentication failed: {}", lossy(line))
            }
            ("token", Expect::Request(n)) => {
                let spec = &self.specs[n];
                assert_eq!(id, spec.id, "c{c}: token frame for the wrong request");
                assert!(spec.stream, "c{c}: token frame for stream:false request {n}");
                let content = str_field("content");
                assert!(!content.is_empty(), "c{c}: empty token frame");
                assert!(
                    self.reqs[n].generation.is_some(),
                    "c{c}: token for request {n} never started"
                );
                conn.cur_tokens.push_str(content);
                self.cov.tokens += 1;
                false
            }
            ("done", Expect::Request(n)) => {
                let spec = &self.specs[n];
                assert_eq!(id, spec.id, "c{c}: done frame for the wrong request");
                let content = str_field("content");
                if spec.stream {
                    assert_eq!(
                        content, conn.cur_tokens,
                        "c{c}: done.content is not the concatenated tokens"
                    );
                } else {
                    assert!(conn.cur_tokens.is_empty());
                }
                conn.cur_tokens.clear();
                conn.expect.pop_front();
                let g = self.reqs[n]
                    .generation
                    .unwrap_or_else(|| panic!("c{c}: done for request {n} never started"));
                let gen_ = &self.gens[&g];
                let Some(GenEnd::Done(comp)) = &gen_.end else {
                    panic!("c{c}: done frame for g{g} whose engine did not report done")
                };
                assert_eq!(
                    content,
                    String::from_utf8_lossy(&gen_.bytes),
                    "c{c}: done.content differs from the engine's bytes"
                );
                let stop = str_field("stop_reason");
                assert_eq!(
                    stop,
                    comp.stop_reason.as_str(),
                    "c{c}: stop_reason differs from the engine's"
                );
                let usage = &obj["usage"];
                assert_eq!(usage["prompt_tokens"], comp.usage.prompt_tokens, "c{c}: usage");
                assert_eq!(usage["completion_tokens"], comp.usage.completion_tokens, "c{c}: usage");
                assert_eq!(str_field("backend"), self.backends[gen_.backend.0].name);
                let ended =
                    gen_.ended_at.unwrap_or_else(|| panic!("g{g} done without an end time"));
                match (obj.get("timings"), self.cfg.timings) {
                    (Some(t), true) => {
                        let total = t["total_ms"].as_u64().unwrap_or(u64::MAX);
                        let queued = t["queued_ms"].as_u64().unwrap_or(u64::MAX);
                        let ttft = t["ttft_ms"].as_u64().unwrap_or(u64::MAX);
                        assert!(
                            total <= ended,
                            "c{c}: total_ms {total} reaches before the start of time"
                        );
                        let admitted = ended - total;
                        assert_eq!(queued, gen_.started_at - admitted, "c{c}: timings.queued_ms");
                        assert_eq!(
                            ttft,
                            gen_.first_token_at.unwrap_or(ended) - admitted,
                            "c{c}: timings.ttft_ms"
                        );
                        self.reqs[n].admitted_at = Some(admitted);
                    }
                    (None, false) => {}
                    (t, on) => panic!("c{c}: timings {t:?} with timings={on}"),
                }
                self.reqs[n].terminal = true;
                self.cov.done += 1;
                true
            }
            ("error", Expect::Request(n)) => {
                let spec = &self.specs[n];
                assert_eq!(id, spec.id, "c{c}: error frame for the wrong request");
                let code = str_field("code");
                let message = str_field("message");
                conn.cur_tokens.clear();
                conn.expect.pop_front();
                if message.contains("draining") {
                    conn.must_close = true;
                }
                self.check_request_error(c, n, code, message);
                true
            }
            ("error", Expect::Invalid(want)) => {
                assert_eq!(str_field("code"), "invalid_request", "c{c}: {}", lossy(line));
                assert_eq!(id, want, "c{c}: invalid_request with the wrong id");
                conn.expect.pop_front();
                self.cov.invalid += 1;
                true
            }
            ("error", Expect::Undecodable(want)) => {
                assert_eq!(str_field("code"), "invalid_request", "c{c}: {}", lossy(line));
                assert_eq!(id, want, "c{c}: invalid_request for an undecodable line: wrong id");
                conn.expect.pop_front();
                self.cov.invalid += 1;
                conn.must_close = true;
                true
            }
            ("error", Expect::Oversize) => {
                assert_eq!(str_field("code"), "frame_too_large", "c{c}: {}", lossy(line));
                assert_eq!(id, "", "c{c}: frame_too_large with an id");
                conn.expect.pop_front();
                self.cov.too_large += 1;
                conn.must_close = true;
                true
            }
            (_, exp) => panic!("c{c}: expected an answer to {exp:?}, got {}", lossy(line)),
        }
    }

    /// Checks an error answer to valid request `n` (either transport) against what its
    /// generation did, and marks the request answered.
    fn check_request_error(&mut self, c: u64, n: usize, code: &str, message: &str) {
        let r = &self.reqs[n];
        let gen_ = r.generation.map(|g| (g, &self.gens[&g]));
        let cov = &mut self.cov;
        if message.contains("draining") {
            cov.draining += 1;
        } else if message.contains("frame cap") {
            cov.over_cap_done += 1;
        } else if message.contains("no backend") {
            cov.no_backend += 1;
        } else if code == "queue_full" {
            cov.queue_full += 1;
        } else if code == "invalid_request" {
            cov.engine_invalid += 1;
        } else {
            cov.backend_failed += 1;
        }
        match (code, gen_) {
            ("queue_full", None) => {}
            ("backend_unavailable", None) => assert!(
                message.contains("no backend") || message.contains("draining"),
                "c{c}: backend_unavailable for a request never started: {message}"
            ),
            ("invalid_request", Some((g, x))) => assert!(
                matches!(x.end, Some(GenEnd::Failed(EngineErrorKind::InvalidRequest))),
                "c{c}: invalid_request for g{g} that the engine did not reject"
            ),
            ("internal", Some((g, x))) => assert!(
                matches!(x.end, Some(GenEnd::Failed(EngineErrorKind::Internal)))
                    && x.token_events == 0,
                "c{c}: internal error for g{g} that did not fail internally before the stream"
            ),
            ("backend_unavailable", Some((g, x)))
                if x.cancelled_at.is_some() && message.contains("drain deadline") =>
            {
                let _ = g;
            }
            ("backend_unavailable", Some((g, x))) => match &x.end {
                Some(GenEnd::Failed(kind)) => assert!(
                    *kind == EngineErrorKind::Unavailable || x.token_events > 0,
                    "c{c}: g{g} failed internally before the stream but got backend_unavailable"
                ),
                Some(GenEnd::Done(_)) => assert!(
                    message.contains("frame cap"),
                    "c{c}: g{g} finished but got backend_unavailable: {message}"
                ),
                None => assert!(
                    x.cancelled_at.is_some() && message.contains("drain deadline"),
                    "c{c}: backend_unavailable for g{g} still running: {message}"
                ),
            },
            (code, g) => panic!(
                "c{c}: error {code:?} ({message}) for valid request {n} (generation {:?})",
                g.map(|g| g.0)
            ),
        }
        self.reqs[n].terminal = true;
    }

    fn check_admin_frame(&mut self, c: u64, line: &[u8]) {
        let v: Value = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("admin c{c}: not JSON ({e}): {}", lossy(line)));
        let obj = v.as_object().unwrap_or_else(|| panic!("admin c{c}: not an object"));
        assert_eq!(obj.get("id"), Some(&Value::from("admin")), "admin c{c}: {}", lossy(line));
        assert_eq!(obj.get("type"), Some(&Value::from("status")), "admin c{c}: {}", lossy(line));
        for (k, val) in obj {
            assert!(
                !val.is_null() || k == "total_bytes",
                "admin c{c}: null field {k:?}: {}",
                lossy(line)
            );
        }
        let status = obj.get("status").and_then(Value::as_str).unwrap_or("");
        match status {
            "starting" | "loading_model" | "ready" | "restarting" | "draining" => {}
            "capabilities" => {
                let b = obj.get("backend").and_then(Value::as_str).unwrap_or("");
                assert!(
                    self.backends.iter().any(|x| x.name == b),
                    "admin c{c}: capabilities of {b:?}"
                );
            }
            "stats" => {
                let num = |k: &str| obj.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX);
                assert!(
                    num("queued") <= u64::from(self.cfg.queue_depth),
                    "admin c{c}: {}",
                    lossy(line)
                );
                assert!(
                    num("active") <= u64::from(self.cfg.active_permits),
                    "admin c{c}: {}",
                    lossy(line)
                );
                assert!(num("connections") <= u64::from(self.cfg.max_connections));
                assert!(num("served") != u64::MAX && num("rejected") != u64::MAX);
                let br = obj.get("breakers").and_then(Value::as_object).unwrap_or_else(|| {
                    panic!("admin c{c}: stats without breakers: {}", lossy(line))
                });
                assert_eq!(br.len(), self.backends.len(), "admin c{c}: breakers {br:?}");
                for (name, st) in br {
                    assert!(self.backends.iter().any(|x| &x.name == name));
                    assert!(
                        matches!(st.as_str(), Some("closed" | "open" | "half_open")),
                        "admin c{c}: breaker state {st}"
                    );
                }
            }
            other => panic!("admin c{c}: unknown status {other:?}"),
        }
    }

    fn on_activity(&mut self, line: &str) {
        let now = self.now;
        self.trace.push_bytes(now, Dir::Out, "Activity", String::new(), line.as_bytes());
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "activity line framing: {line:?}"
        );
        assert!(!line.contains("PROMPT-"), "an activity record contains prompt text: {line}");
        assert!(
            !line.contains("GEN-OUTPUT-"),
            "an activity record contains generated text: {line}"
        );
        if let Some(key) = &self.cfg.api_key {
            assert!(
                !line.contains(key.as_str()),
                "an activity record contains the API key: {line}"
            );
        }
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("activity record is not JSON ({e}): {line}"));
        let t = v["t"].as_str().unwrap_or_else(|| panic!("activity without t: {line}"));
        assert!(t.len() == 24 && t.ends_with('Z'), "activity t is not RFC 3339 ms UTC: {t}");
        assert!(matches!(v["level"].as_str(), Some("info" | "warn")), "activity level: {line}");
        assert!(v["component"].is_string(), "activity component: {line}");
        let msg = v["msg"].as_str().unwrap_or_else(|| panic!("activity without msg: {line}"));
        let req = v["req_id"].as_str().and_then(|id| self.req_by_id.get(id).copied());
        match msg {
            "request_done" => {
                let n =
                    req.unwrap_or_else(|| panic!("request_done for an unknown request: {line}"));
                let stop = v["stop_reason"].as_str().unwrap_or("");
                let total = v["total_ms"].as_u64().unwrap_or_else(|| panic!("no total_ms: {line}"));
                let queued =
                    v["queued_ms"].as_u64().unwrap_or_else(|| panic!("no queued_ms: {line}"));
                assert!(total <= now, "total_ms reaches before the start of time: {line}");
                let mut admitted = now - total;
                let r = &mut self.reqs[n];
                r.end_record = true;
                if stop == "cancelled" {
                    assert!(!r.cancel_record, "two cancellation records for request {n}");
                    r.cancel_record = true;
                    match r.generation {
                        Some(g) => {
                            // Logged once the engine gave its account (or the daemon gave
                            // up on it), timed to when the client's side ended.
                            let gen_ = &self.gens[&g];
                            let cancelled = gen_.cancelled_at.unwrap_or_else(|| {
                                panic!("a cancellation record for g{g} never cancelled: {line}")
                            });
                            assert!(
                                gen_.end.is_some() || self.shutdown_at.is_some(),
                                "the cancellation record of g{g} came before its engine's account: {line}"
                            );
                            assert!(total <= cancelled, "total_ms past the cancel: {line}");
                            admitted = cancelled - total;
                            assert_eq!(queued, gen_.started_at - admitted, "queued_ms: {line}");
                            if let Some(GenEnd::Done(c)) = &gen_.end {
                                assert_eq!(
                                    v["prompt_tokens"].as_u64(),
                                    Some(u64::from(c.usage.prompt_tokens)),
                                    "a cancelled request's record has the engine's prompt size: {line}"
                                );
                            }
                            r.admitted_at = Some(admitted);
                        }
                        None => {
                            assert!(
                                v.get("backend").is_none(),
                                "a queued cancel names a backend: {line}"
                            );
                            assert_eq!(
                                queued, total,
                                "queued cancel: queued_ms != total_ms: {line}"
                            );
                            r.queued_cancel_at = Some(now);
                            r.admitted_at = Some(admitted);
                            self.cov.queued_cancels += 1;
                        }
                    }
                } else {
                    self.served_records += 1;
                    let g = r
                        .generation
                        .unwrap_or_else(|| panic!("request_done for request {n} never started"));
                    let gen_ = &self.gens[&g];
                    let Some(GenEnd::Done(comp)) = &gen_.end else {
                        panic!("request_done for g{g} whose engine did not report done: {line}")
                    };
                    assert_eq!(stop, comp.stop_reason.as_str(), "request_done stop_reason: {line}");
                    assert_eq!(v["completion_tokens"], comp.usage.completion_tokens, "{line}");
                    assert_eq!(v["prompt_tokens"], comp.usage.prompt_tokens, "{line}");
                    assert_eq!(
                        v["backend"].as_str(),
                        Some(self.backends[gen_.backend.0].name.as_str())
                    );
                    assert_eq!(queued, gen_.started_at - admitted, "queued_ms: {line}");
                    r.admitted_at = Some(admitted);
                }
            }
            "request_rejected" => {
                let code = v["code"].as_str().unwrap_or("");
                if code == "queue_full" {
                    self.queue_full_records += 1;
                }
                if let Some(n) = req {
                    self.reqs[n].end_record = true;
                }
                if code == "backend_unavailable"
                    && v.get("backend").is_none()
                    && self.shutdown_at.is_none()
                {
                    // The daemon found no backend: the reference router must agree.
                    if let Some(r) = self.model.route(Time::from_millis(now)) {
                        panic!(
                            "the daemon found no backend for {:?}, but the reference router offers backend {} (trial {})",
                            v["req_id"], r.backend, r.trial
                        );
                    }
                }
            }
            "request_error_mid_stream" => {
                if let Some(n) = req {
                    self.reqs[n].end_record = true;
                }
            }
            _ => {}
        }
    }

    fn trace_input(&mut self, i: &Input) {
        let t = self.now;
        let tr = &mut self.trace;
        match i {
            Input::Accepted { conn, listener, peer } => tr.push(
                t,
                Dir::In,
                "Accepted",
                format!("c{} {listener:?} {:?}", conn.0, peer.transport),
            ),
            Input::Received { conn, bytes } => {
                tr.push_bytes(t, Dir::In, "Received", format!("c{}", conn.0), bytes)
            }
            Input::ReadClosed { conn } => tr.push(t, Dir::In, "ReadClosed", format!("c{}", conn.0)),
            Input::HungUp { conn } => tr.push(t, Dir::In, "HungUp", format!("c{}", conn.0)),
            Input::Flushed { conn } => tr.push(t, Dir::In, "Flushed", format!("c{}", conn.0)),
            Input::Engine { generation, event } => match event {
                EngineEvent::Token(b) => {
                    tr.push_bytes(t, Dir::In, "Engine.Token", format!("g{}", generation.0), b)
                }
                EngineEvent::Done(c) => tr.push(
                    t,
                    Dir::In,
                    "Engine.Done",
                    format!("g{} {:?} {:?}", generation.0, c.stop_reason, c.usage),
                ),
                EngineEvent::Failed(e) => tr.push(
                    t,
                    Dir::In,
                    "Engine.Failed",
                    format!("g{} {:?} {}", generation.0, e.kind, e.message),
                ),
            },
            Input::BackendPhase { backend, phase } => {
                tr.push(t, Dir::In, "BackendPhase", format!("b{backend} {phase:?}"))
            }
            Input::BackendLoaded { backend, .. } => {
                tr.push(t, Dir::In, "BackendLoaded", format!("b{backend}"))
            }
            Input::BackendFailed { backend, error } => {
                tr.push(t, Dir::In, "BackendFailed", format!("b{backend} {error}"))
            }
            Input::BackendReadiness { backend, ready } => {
                tr.push(t, Dir::In, "BackendReady", format!("b{backend} ready={ready}"))
            }
            Input::Timeout => tr.push(t, Dir::In, "Timeout", String::new()),
            Input::Shutdown => tr.push(t, Dir::In, "Shutdown", String::new()),
        }
    }
}

fn short_output(o: &Output) -> String {
    match o {
        Output::Send { conn, bytes } => format!("Send c{} {}", conn.0, lossy(bytes)),
        Output::Activity(l) => format!("Activity {l}"),
        Output::Start { generation, backend, .. } => format!("Start g{} b{backend}", generation.0),
        other => format!("{other:?}"),
    }
}
