//! The worker's decode loop: continuous batching of up to `n_parallel` sequences in one
//! context.
//!
//! Each step builds one batch holding the next token of every generating sequence and
//! prompt chunks of starting ones (the rest of the batch's room, shared round robin),
//! decodes it once, and samples every sequence whose logits it produced with that
//! sequence's own samplers. A cancelled request leaves at the next step, its slot free at
//! once. Each slot remembers the tokens its KV cache holds, so a request that resends a
//! conversation reuses the prefix it shares with a free slot.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use inferd_core::engine::{
    CancelFlag, Completion, EngineError, GenerateRequest, StopReason, Usage,
};
use llama_cpp_sys_2 as sys;

use crate::batch::Batch;
use crate::sampling::{DEFAULT_SEED, Sampling};
use crate::session::Session;
use crate::slots::{self, Candidate};
use crate::{Shared, Step};

/// The last incident number given out, shared by every llama engine of the process so
/// that no two engines' incidents share a number.
static LAST_INCIDENT: AtomicU64 = AtomicU64::new(0);

/// A fresh number for one failure of the backend that several requests share.
fn next_incident() -> u64 {
    LAST_INCIDENT.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
}

/// A generation for the worker, its prompt already tokenized.
pub(crate) struct Job {
    /// The templated prompt's tokens (never empty, at most `n_ctx`).
    pub tokens: Vec<sys::llama_token>,
    /// The request, for its sampling parameters and limits.
    pub request: GenerateRequest,
    /// Raised when the client no longer wants the result.
    pub cancel: CancelFlag,
    /// Where tokens and the end go.
    pub events: Sender<Event>,
}

/// What reaches the worker.
pub(crate) enum Msg {
    /// A generation.
    Job(Job),
    /// Look at the gate again (it was released).
    Wake,
}

/// What the worker reports about a generation.
pub(crate) enum Event {
    /// The bytes of one token.
    Token(Vec<u8>),
    /// The end.
    Done(Result<Completion, EngineError>),
}

/// A request occupying a slot.
struct Run {
    prompt: Vec<sys::llama_token>,
    sampling: Sampling,
    cancel: CancelFlag,
    events: Sender<Event>,
    max_tokens: u32,
    generated: u32,
    /// Prompt tokens found in the slot's cache.
    cached_tokens: u32,
    /// The last sampled token, to be decoded next step; `None` while prefilling.
    next: Option<sys::llama_token>,
}

/// One sequence of the context.
struct Slot {
    seq: sys::llama_seq_id,
    /// The tokens in this sequence's KV cache, positions 0.. in order.
    cached: Vec<sys::llama_token>,
    /// The scheduler's clock when the slot was last used.
    last_used: u64,
    run: Option<Run>,
}

/// A slot's part of one batch.
#[derive(Clone, Copy, Debug)]
struct Entry {
    slot: usize,
    /// Tokens this entry adds (1 for a generating sequence).
    n: usize,
    /// Whether the batch asks for logits of the entry's last token.
    logits: bool,
}

/// The decode loop's state.
pub(crate) struct Scheduler {
    session: Session,
    slots: Vec<Slot>,
    waiting: VecDeque<Job>,
    batch: Batch,
    shared: Arc<Shared>,
    /// Requests started, for default seeds.
    requests: u64,
    /// Ticks once per use of a slot, for least-recently-used choice.
    clock: u64,
    /// Where the next step's prompt chunks start, so starting sequences take turns.
    round_robin: usize,
    /// Successful decodes so far.
    decodes: u64,
    piece: Vec<u8>,
}

impl Scheduler {
    /// A scheduler over a loaded session.
    pub(crate) fn new(session: Session, shared: Arc<Shared>) -> Result<Scheduler, EngineError> {
        let batch = Batch::new(session.n_batch() as usize)?;
        let slots = (0..session.n_parallel())
            .map(|i| Slot {
                seq: i32::try_from(i).unwrap_or(i32::MAX),
                cached: Vec::new(),
                last_used: 0,
                run: None,
            })
            .collect();
        Ok(Scheduler {
            session,
            slots,
            waiting: VecDeque::new(),
            batch,
            shared,
            requests: 0,
            clock: 0,
            round_robin: 0,
            decodes: 0,
            piece: Vec::with_capacity(32),
        })
    }

    /// Serves jobs until the channel closes and nothing is left to do.
    pub(crate) fn run(mut self, msgs: Receiver<Msg>) {
        let mut open = true;
        loop {
            let busy = self.slots.iter().any(|s| s.run.is_some());
            let can_admit = !self.waiting.is_empty() && !self.shared.gate.held();
            if !busy && !can_admit {
                if !open {
                    return;
                }
                match msgs.recv() {
                    Ok(msg) => self.take(msg),
                    Err(_) => open = false,
                }
            }
            loop {
                match msgs.try_recv() {
                    Ok(msg) => self.take(msg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.shared.gate.set_waiting(self.waiting.len());
            if !self.shared.gate.held() {
                self.admit();
            }
            if self.slots.iter().any(|s| s.run.is_some()) {
                self.step();
            }
        }
    }

    fn take(&mut self, msg: Msg) {
        if let Msg::Job(job) = msg {
            self.waiting.push_back(job);
        }
    }

    /// Starts waiting jobs while slots are free.
    fn admit(&mut self) {
        while self.slots.iter().any(|s| s.run.is_none()) {
            let Some(job) = self.waiting.pop_front() else { break };
            self.start(job);
        }
    }

    /// Puts a job in the free slot that already holds most of its prompt.
    fn start(&mut self, job: Job) {
        let request_no = self.requests;
        self.requests = self.requests.wrapping_add(1);
        let prompt_tokens = u32::try_from(job.tokens.len()).unwrap_or(u32::MAX);
        let done = |stop| Completion::new(Usage { prompt_tokens, completion_tokens: 0 }, stop);
        if job.cancel.is_cancelled() {
            let _ = job.events.send(Event::Done(Ok(done(StopReason::Cancelled))));
            return;
        }
        if job.request.max_tokens == 0 {
            let _ = job.events.send(Event::Done(Ok(done(StopReason::Length))));
            return;
        }
        let sampling =
            match Sampling::new(self.session.model(), &job.request, DEFAULT_SEED ^ request_no) {
                Ok(sampling) => sampling,
                Err(e) => {
                    let _ = job.events.send(Event::Done(Err(e)));
                    return;
                }
            };
        let free = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.run.is_none())
            .map(|(i, s)| Candidate { index: i, cached: &s.cached, last_used: s.last_used });
        let Some((index, shared)) = slots::choose(free, &job.tokens) else {
            // `admit` only starts jobs while a slot is free.
            self.waiting.push_front(job);
            return;
        };
        // At least one prompt token is decoded, so the first sample has fresh logits.
        let mut keep = shared.min(job.tokens.len() - 1);
        let slot = &mut self.slots[index];
        let partial_ok = !self.shared.full_prefill.load(Ordering::Relaxed)
            && self.session.truncate(slot.seq, keep);
        if !partial_ok {
            // The memory cannot drop a partial range (or a test says so): start over.
            self.session.forget(slot.seq);
            keep = 0;
        }
        slot.cached.truncate(keep);
        self.clock += 1;
        slot.last_used = self.clock;
        slot.run = Some(Run {
            prompt: job.tokens,
            sampling,
            cancel: job.cancel,
            events: job.events,
            max_tokens: job.request.max_tokens,
            generated: 0,
            cached_tokens: u32::try_from(keep).unwrap_or(u32::MAX),
            next: None,
        });
    }

    /// Ends the run in `slot` with `result` (a stop reason or an error); the slot is free.
    fn finish(&mut self, slot: usize, result: Result<StopReason, EngineError>) {
        let slot = &mut self.slots[slot];
        let Some(run) = slot.run.take() else { return };
        self.clock += 1;
        slot.last_used = self.clock;
        let prompt_tokens = u32::try_from(run.prompt.len()).unwrap_or(u32::MAX);
        let result = result.map(|stop| {
            let mut c =
                Completion::new(Usage { prompt_tokens, completion_tokens: run.generated }, stop);
            c.prompt_cached_tokens = run.cached_tokens;
            c
        });
        let _ = run.events.send(Event::Done(result));
    }

    /// Drops KV cells a failed or aborted decode may have left past what `slot` records.
    /// Where the memory cannot drop part of a sequence, the slot is cleared, and a run in
    /// it, which cannot go on from nothing, fails.
    fn roll_back(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if !self.session.truncate(slot.seq, slot.cached.len()) {
            self.session.forget(slot.seq);
            slot.cached.clear();
            self.finish(
                index,
                Err(EngineError::internal("llama.cpp could not undo a failed decode")),
            );
        }
    }

    /// One decode of every running sequence (more than one when llama.cpp refuses the
    /// whole batch or a cancel interrupts it).
    fn step(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].run.as_ref().is_some_and(|r| r.cancel.is_cancelled()) {
                self.finish(i, Ok(StopReason::Cancelled));
            }
        }
        // Parts of this step's batch still to decode, the next one last.
        let mut parts = vec![self.plan()];
        while let Some(mut entries) = parts.pop() {
            // A retried part: some runs may have ended since, and each entry must still
            // ask for logits exactly where its prompt ends.
            entries.retain_mut(|e| {
                let s = &self.slots[e.slot];
                let Some(run) = &s.run else { return false };
                if run.next.is_none() {
                    let left = run.prompt.len() - s.cached.len();
                    e.n = e.n.min(left);
                    e.logits = e.n == left;
                }
                e.n > 0
            });
            if entries.is_empty() {
                continue;
            }
            self.fill(&entries);
            if self.shared.fail_decode_after.load(Ordering::Relaxed) == self.decodes + 1 {
                self.shared.fail_decode_after.store(0, Ordering::Relaxed);
                self.batch.skip_a_position();
            }
            let flags = entries
                .iter()
                .filter_map(|e| self.slots[e.slot].run.as_ref().map(|r| r.cancel.clone()));
            self.session.abort_flags().set(flags);
            let (rc, why) = self.session.decode(&self.batch);
            self.session.abort_flags().set([]);
            if rc != 0 {
                // Whatever the failed decode left in the KV cache goes; each slot keeps
                // what it records.
                for e in &entries {
                    self.roll_back(e.slot);
                }
            }
            match rc {
                0 => {
                    self.decodes += 1;
                    self.report(&entries);
                    self.advance(&entries);
                }
                // No KV room for the whole batch: each half on its own, first half first.
                1 if entries.len() > 1 => {
                    let second = entries.split_off(entries.len() / 2);
                    parts.push(second);
                    parts.push(entries);
                }
                // One prompt chunk that does not fit: a smaller one (the rest comes in
                // later steps).
                1 if entries[0].n > 1 => {
                    parts.push(vec![Entry { n: entries[0].n / 2, logits: false, ..entries[0] }]);
                }
                // One token that does not fit: this sequence's context is full.
                1 => {
                    let slot = entries[0].slot;
                    let generating =
                        self.slots[slot].run.as_ref().is_some_and(|r| r.next.is_some());
                    let result = if generating {
                        Ok(StopReason::Length)
                    } else {
                        Err(EngineError::internal("context full while reading the prompt"))
                    };
                    self.finish(slot, result);
                }
                // Interrupted because a sequence in it was cancelled: the cancelled ones
                // end, the others go again.
                2 if entries.iter().any(|e| self.cancelled(e.slot)) => {
                    entries.retain(|e| !self.cancelled(e.slot));
                    for i in 0..self.slots.len() {
                        if self.cancelled(i) {
                            self.finish(i, Ok(StopReason::Cancelled));
                        }
                    }
                    parts.push(entries);
                }
                rc => {
                    // One failure of the backend, however many requests it ends: the
                    // breaker counts it once.
                    let why = why.unwrap_or_else(|| format!("llama_decode failed with code {rc}"));
                    let error = EngineError::unavailable(why).in_incident(next_incident());
                    for e in &entries {
                        self.finish(e.slot, Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Whether the run in `slot` (if any) was cancelled.
    fn cancelled(&self, slot: usize) -> bool {
        self.slots[slot].run.as_ref().is_some_and(|r| r.cancel.is_cancelled())
    }

    /// What the next batch holds: every generating sequence's next token, then prompt
    /// chunks of starting sequences in turn, within the batch's room.
    fn plan(&mut self) -> Vec<Entry> {
        let room = self.session.n_batch() as usize;
        let mut entries: Vec<Entry> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.run.as_ref().is_some_and(|r| r.next.is_some()))
            .map(|(slot, _)| Entry { slot, n: 1, logits: true })
            .collect();
        let mut used = entries.len();
        let n = self.slots.len();
        let start = self.round_robin % n.max(1);
        self.round_robin = self.round_robin.wrapping_add(1);
        for k in 0..n {
            let slot = (start + k) % n;
            let s = &self.slots[slot];
            let Some(run) = s.run.as_ref().filter(|r| r.next.is_none()) else { continue };
            if used >= room {
                break;
            }
            let left = run.prompt.len() - s.cached.len();
            let take = left.min(room - used);
            if take == 0 {
                continue;
            }
            entries.push(Entry { slot, n: take, logits: take == left });
            used += take;
        }
        entries
    }

    /// Writes `entries` into the batch.
    fn fill(&mut self, entries: &[Entry]) {
        self.batch.clear();
        for e in entries {
            let s = &self.slots[e.slot];
            let Some(run) = &s.run else { continue };
            let from = s.cached.len();
            let tokens = match run.next {
                Some(ref t) => std::slice::from_ref(t),
                None => &run.prompt[from..from + e.n],
            };
            for (i, &t) in tokens.iter().enumerate() {
                let pos = i32::try_from(from + i).unwrap_or(i32::MAX);
                self.batch.push(t, pos, s.seq, e.logits && i + 1 == tokens.len());
            }
        }
    }

    /// Tells the statistics and the test hook about a decoded batch.
    fn report(&mut self, entries: &[Entry]) {
        let generating = entries
            .iter()
            .filter(|e| self.slots[e.slot].run.as_ref().is_some_and(|r| r.next.is_some()))
            .count();
        let step = Step {
            sequences: entries.len(),
            generating,
            prefilling: entries.len() - generating,
            tokens: self.batch.len(),
        };
        self.shared.largest_batch.fetch_max(entries.len(), Ordering::Relaxed);
        let mut hook = self.shared.hook.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = hook.as_mut() {
            hook(&step);
        }
    }

    /// Records what a successful decode added and samples where it produced logits.
    fn advance(&mut self, entries: &[Entry]) {
        let mut index = 0;
        for e in entries {
            index += e.n;
            let s = &mut self.slots[e.slot];
            let Some(run) = s.run.as_mut() else { continue };
            match run.next.take() {
                Some(t) => s.cached.push(t),
                None => {
                    let from = s.cached.len();
                    s.cached.extend_from_slice(&run.prompt[from..from + e.n]);
                }
            }
            if e.logits {
                self.sample(e.slot, index - 1);
            }
        }
    }

    /// Samples the next token of the run in `slot` from batch entry `index`, sends it,
    /// and ends the run when it is over.
    fn sample(&mut self, slot: usize, index: usize) {
        let Some(run) = self.slots[slot].run.as_ref() else { return };
        let token = match self.session.sample_at(index, &run.sampling) {
            Ok(token) => token,
            Err(e) => return self.finish(slot, Err(e)),
        };
        if self.session.model().is_eog(token) {
            return self.finish(slot, Ok(StopReason::End));
        }
        if let Err(e) = self.session.model().piece(token, &mut self.piece) {
            return self.finish(slot, Err(e));
        }
        let n_ctx = self.session.n_ctx() as usize;
        let s = &mut self.slots[slot];
        let Some(run) = s.run.as_mut() else { return };
        if !self.piece.is_empty() && run.events.send(Event::Token(self.piece.clone())).is_err() {
            // Nobody receives it: not delivered.
            return self.finish(slot, Ok(StopReason::Cancelled));
        }
        run.generated += 1;
        if run.generated >= run.max_tokens || s.cached.len() >= n_ctx {
            return self.finish(slot, Ok(StopReason::Length));
        }
        run.next = Some(token);
    }
}
