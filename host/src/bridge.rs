//! The engine-thread bridge: engines run on OS threads the shell owns, and their events
//! travel back to the driver through its event channel.
//!
//! Generations run on a pool that grows on demand and keeps its threads: starting a
//! thread per generation would cost more than a one-token request itself.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use async_channel::Sender;

use inferd_core::engine::{CancelFlag, Engine, EngineError, EngineEvent, GenerateRequest};
use inferd_core::{BackendId, GenId, Input};

struct Job {
    generation: GenId,
    engine: Arc<dyn Engine>,
    request: GenerateRequest,
    cancel: CancelFlag,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    shutdown: bool,
}

/// Runs generations on pooled threads and reports their events.
pub struct EnginePool {
    engines: Vec<Arc<dyn Engine>>,
    /// Loading progress and failures the driver raises itself (never blocks).
    events: Sender<Input>,
    /// Generation events; bounded, so an engine faster than the driver waits for it.
    generations: Sender<Input>,
    shared: Arc<(Mutex<Queue>, Condvar)>,
}

impl EnginePool {
    /// A pool over the configured engines (priority order). Loading events go to
    /// `events`; generation events to `generations`, whose bound is the backpressure
    /// that keeps a fast engine from burying the driver's socket events.
    pub fn new(
        engines: Vec<Arc<dyn Engine>>,
        events: Sender<Input>,
        generations: Sender<Input>,
    ) -> Self {
        EnginePool { engines, events, generations, shared: Arc::default() }
    }

    /// Loads every engine on a thread of its own, reporting phases and the outcome.
    pub fn load_all(&self) {
        for (i, engine) in self.engines.iter().enumerate() {
            let backend = BackendId(i);
            let engine = engine.clone();
            let events = self.events.clone();
            let spawned = std::thread::Builder::new().name(format!("inferd-load-{backend}")).spawn(
                move || {
                    let progress_events = events.clone();
                    let mut progress = |phase| {
                        let _ =
                            progress_events.send_blocking(Input::BackendPhase { backend, phase });
                    };
                    let outcome = catch_unwind(AssertUnwindSafe(|| engine.load(&mut progress)))
                        .unwrap_or_else(|_| {
                            Err(EngineError::internal("engine panicked while loading"))
                        });
                    let event = match outcome {
                        Ok(capabilities) => Input::BackendLoaded { backend, capabilities },
                        Err(error) => Input::BackendFailed { backend, error },
                    };
                    let _ = events.send_blocking(event);
                },
            );
            if let Err(e) = spawned {
                let error = EngineError::internal(format!("cannot start a loader thread: {e}"));
                let _ = self.events.try_send(Input::BackendFailed { backend, error });
            }
        }
    }

    /// Starts a generation; its events arrive as [`Input::Engine`], on the channel, or
    /// appended to `inline` when the engine ran it on this thread (see
    /// [`Engine::runs_inline`]).
    pub fn start(
        &self,
        generation: GenId,
        backend: BackendId,
        request: GenerateRequest,
        inline: &mut VecDeque<Input>,
    ) -> CancelFlag {
        let cancel = CancelFlag::new();
        let Some(engine) = self.engines.get(backend.0).cloned() else {
            let event = EngineEvent::Failed(EngineError::internal("no such backend"));
            inline.push_back(Input::Engine { generation, event });
            return cancel;
        };
        if engine.runs_inline(&request) {
            let mut on_token = |bytes: &[u8]| {
                let event = EngineEvent::Token(bytes.to_vec());
                inline.push_back(Input::Engine { generation, event });
            };
            let event = finish_event(catch_unwind(AssertUnwindSafe(|| {
                engine.generate(&request, &cancel, &mut on_token)
            })));
            inline.push_back(Input::Engine { generation, event });
            return cancel;
        }
        let (lock, cvar) = &*self.shared;
        let mut q = lock.lock().unwrap_or_else(PoisonError::into_inner);
        q.jobs.push_back(Job { generation, engine, request, cancel: cancel.clone() });
        let short = q.jobs.len() > q.idle;
        drop(q);
        cvar.notify_one();
        if short {
            self.spawn_worker();
        }
        cancel
    }

    fn spawn_worker(&self) {
        let shared = self.shared.clone();
        let events = self.generations.clone();
        let spawned = std::thread::Builder::new()
            .name("inferd-engine".into())
            .spawn(move || worker(shared, events));
        if let Err(e) = spawned {
            // Fail the queued job rather than leave it waiting for a thread forever.
            let (lock, _) = &*self.shared;
            let job = lock.lock().unwrap_or_else(PoisonError::into_inner).jobs.pop_back();
            if let Some(job) = job {
                let event = EngineEvent::Failed(EngineError::unavailable(format!(
                    "cannot start an engine thread: {e}"
                )));
                let _ = self.events.try_send(Input::Engine { generation: job.generation, event });
            }
        }
    }
}

impl Drop for EnginePool {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).shutdown = true;
        cvar.notify_all();
    }
}

fn worker(shared: Arc<(Mutex<Queue>, Condvar)>, events: Sender<Input>) {
    let (lock, cvar) = &*shared;
    loop {
        let job = {
            let mut q = lock.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                q.idle += 1;
                q = cvar.wait(q).unwrap_or_else(PoisonError::into_inner);
                q.idle -= 1;
            }
        };
        run_job(job, &events);
    }
}

fn run_job(job: Job, events: &Sender<Input>) {
    let generation = job.generation;
    let mut on_token = |bytes: &[u8]| {
        let event = EngineEvent::Token(bytes.to_vec());
        let _ = events.send_blocking(Input::Engine { generation, event });
    };
    let event = finish_event(catch_unwind(AssertUnwindSafe(|| {
        job.engine.generate(&job.request, &job.cancel, &mut on_token)
    })));
    let _ = events.send_blocking(Input::Engine { generation, event });
}

/// The terminal event of a generation; a panic becomes an internal failure.
fn finish_event(
    result: std::thread::Result<Result<inferd_core::engine::Completion, EngineError>>,
) -> EngineEvent {
    match result.unwrap_or_else(|_| Err(EngineError::internal("engine panicked"))) {
        Ok(done) => EngineEvent::Done(done),
        Err(e) => EngineEvent::Failed(e),
    }
}
