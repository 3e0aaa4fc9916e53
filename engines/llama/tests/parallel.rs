//! The llama.cpp engine's continuous batching, prefix reuse and per-sequence cancellation,
//! against the committed tiny scripted model. Concurrent requests are started together
//! with `LlamaEngine::hold` and cancelled at chosen steps from the step hook, which runs
//! on the decode thread: no test depends on timing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;

use inferd_core::engine::{
    CancelFlag, Completion, Engine, EngineError, EngineErrorKind, GenerateRequest, Message, Role,
    StopReason,
};
use inferd_engine_llama::{LlamaConfig, LlamaEngine, Step};

const SENTENCE: &str = " the quick brown fox jumps over a lazy dog.";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-scripted.gguf")
}

fn engine(n_ctx: u32, n_parallel: u32, n_batch: u32) -> Arc<LlamaEngine> {
    let config =
        LlamaConfig { n_ctx, n_parallel, n_batch, n_threads: 1, ..LlamaConfig::new(fixture()) };
    let engine = LlamaEngine::new(config);
    let caps = engine.load(&mut |_| {}).expect("the fixture loads");
    assert_eq!(caps.n_parallel, Some(n_parallel));
    assert_eq!(caps.n_ctx, Some(n_ctx));
    assert_eq!(engine.parallelism(), n_parallel);
    Arc::new(engine)
}

fn messages(contents: &[&str]) -> Vec<Message> {
    let roles = [Role::User, Role::Assistant];
    contents
        .iter()
        .enumerate()
        .map(|(i, c)| Message { role: roles[i % 2], content: (*c).into() })
        .collect()
}

fn request(content: &str) -> GenerateRequest {
    GenerateRequest {
        messages: messages(&[content]),
        temperature: 0.0,
        ..GenerateRequest::default()
    }
}

type Outcome = (String, Result<Completion, EngineError>);

/// Runs `req` on its own thread with `cancel`; `cancel_after` pieces raise it.
fn spawn(
    engine: &Arc<LlamaEngine>,
    req: GenerateRequest,
    cancel: CancelFlag,
    cancel_after: Option<usize>,
) -> thread::JoinHandle<Outcome> {
    let engine = Arc::clone(engine);
    thread::spawn(move || {
        let mut pieces = 0;
        let mut out = Vec::new();
        let result = engine.generate(&req, &cancel, &mut |piece| {
            out.extend_from_slice(piece);
            pieces += 1;
            if cancel_after == Some(pieces) {
                cancel.cancel();
            }
        });
        (String::from_utf8(out).expect("UTF-8 output"), result)
    })
}

fn run(engine: &LlamaEngine, req: &GenerateRequest) -> Outcome {
    let mut out = Vec::new();
    let result =
        engine.generate(req, &CancelFlag::new(), &mut |piece| out.extend_from_slice(piece));
    (String::from_utf8(out).expect("UTF-8 output"), result)
}

/// Starts `reqs` while the engine holds them back, so they all start in one step.
fn together(
    engine: &Arc<LlamaEngine>,
    reqs: Vec<(GenerateRequest, CancelFlag, Option<usize>)>,
) -> Vec<Outcome> {
    let hold = engine.hold();
    let n = reqs.len();
    let threads: Vec<_> =
        reqs.into_iter().map(|(req, cancel, after)| spawn(engine, req, cancel, after)).collect();
    hold.wait_for(n);
    drop(hold);
    threads.into_iter().map(|t| t.join().expect("no panic")).collect()
}

/// Records every decode step.
fn record_steps(engine: &LlamaEngine) -> Arc<Mutex<Vec<Step>>> {
    let steps = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&steps);
    engine.set_step_hook(Some(Box::new(move |step| sink.lock().unwrap().push(*step))));
    steps
}

#[test]
fn concurrent_requests_decode_together_and_get_the_sentence() {
    for n in [1usize, 2, 4, 8] {
        let engine = engine(256, 4, 512);
        let steps = record_steps(&engine);
        let reqs = (0..n)
            .map(|i| (request(&format!("Tell me story {i}")), CancelFlag::new(), None))
            .collect();
        for (text, result) in together(&engine, reqs) {
            let completion = result.unwrap();
            assert_eq!(text, SENTENCE, "n = {n}");
            assert_eq!(completion.stop_reason, StopReason::End);
            assert_eq!(completion.usage.completion_tokens, 10);
        }
        // They were admitted in one step, so the first batch held them all (up to 4).
        assert_eq!(engine.largest_batch(), n.min(4), "n = {n}");
        let steps = steps.lock().unwrap();
        assert_eq!(steps[0].sequences, n.min(4), "{steps:?}");
        assert_eq!(steps[0].prefilling, n.min(4), "{steps:?}");
        // Each request needs one prompt step and ten token steps; the batches overlap
        // them, so the whole run takes far fewer steps than one request after another.
        assert!(steps.len() < 11 * n.div_ceil(4) + 11, "n = {n}: {} steps", steps.len());
    }
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_between_decode_steps() {
    let engine = engine(512, 2, 16);
    let steps = record_steps(&engine);
    let long = "tell me a story ".repeat(20);
    let outcomes = together(
        &engine,
        vec![(request(&long), CancelFlag::new(), None), (request("hi"), CancelFlag::new(), None)],
    );
    for (text, result) in outcomes {
        assert_eq!(text, SENTENCE);
        assert_eq!(result.unwrap().stop_reason, StopReason::End);
    }
    let steps = steps.lock().unwrap();
    assert!(steps.iter().all(|s| s.tokens <= 16), "{steps:?}");
    // Some step both generated a token for the short request and read a chunk of the
    // long prompt: the long prompt did not stall the other stream.
    assert!(steps.iter().any(|s| s.generating == 1 && s.prefilling == 1), "{steps:?}");
}

#[test]
fn a_full_context_ends_only_its_own_sequence() {
    let engine = engine(64, 2, 512);
    let outcomes = together(
        &engine,
        vec![
            (
                GenerateRequest { max_tokens: 100_000, ..request("say it again") },
                CancelFlag::new(),
                None,
            ),
            (request("Tell me a story"), CancelFlag::new(), None),
        ],
    );
    let (text, result) = &outcomes[0];
    let completion = result.as_ref().unwrap();
    assert_eq!(completion.stop_reason, StopReason::Length);
    let n = completion.usage.completion_tokens;
    assert!(n > 0);
    assert_eq!(completion.usage.prompt_tokens + n, 65, "{completion:?}");
    assert_eq!(*text, " again".repeat(n as usize));
    let (text, result) = &outcomes[1];
    assert_eq!(text, SENTENCE);
    assert_eq!(result.as_ref().unwrap().stop_reason, StopReason::End);
    assert_eq!(engine.largest_batch(), 2);
}

#[test]
fn max_tokens_is_per_sequence() {
    let engine = engine(256, 4, 512);
    let reqs = (1..=4u32)
        .map(|k| {
            let req = GenerateRequest { max_tokens: k, ..request(&format!("story {k}")) };
            (req, CancelFlag::new(), None)
        })
        .collect();
    let expected = [" the", " the quick", " the quick brown", " the quick brown fox"];
    for (k, (text, result)) in together(&engine, reqs).into_iter().enumerate() {
        let completion = result.unwrap();
        assert_eq!(completion.stop_reason, StopReason::Length);
        assert_eq!(completion.usage.completion_tokens as usize, k + 1);
        assert_eq!(text, expected[k]);
    }
}

#[test]
fn a_second_turn_reuses_the_first_turns_cache() {
    let first = messages(&["Tell me a story"]);
    let second = messages(&["Tell me a story", SENTENCE.trim(), "And another one"]);
    let req = |m: &[Message]| GenerateRequest { messages: m.to_vec(), ..request("") };

    let cold = engine(256, 2, 512);
    let (cold_text, cold_result) = run(&cold, &req(&second));
    let cold_result = cold_result.unwrap();
    assert_eq!(cold_result.prompt_cached_tokens, 0);

    let warm = engine(256, 2, 512);
    let (text, result) = run(&warm, &req(&first));
    let turn1 = result.unwrap();
    assert_eq!(text, SENTENCE);
    let (text, result) = run(&warm, &req(&second));
    let turn2 = result.unwrap();
    assert_eq!(text, cold_text);
    assert_eq!(turn2.usage, cold_result.usage);
    assert_eq!(turn2.stop_reason, cold_result.stop_reason);
    assert!(turn2.prompt_cached_tokens > 0, "{turn2:?}");
    assert!(turn2.prompt_cached_tokens >= turn1.usage.prompt_tokens - 1, "{turn1:?} {turn2:?}");
    assert!(turn2.prompt_cached_tokens < turn2.usage.prompt_tokens, "{turn2:?}");

    // Where the memory cannot drop part of a sequence, the whole prompt is read again,
    // with the same result.
    let full = engine(256, 2, 512);
    full.force_full_prefill(true);
    run(&full, &req(&first)).1.unwrap();
    let (text, result) = run(&full, &req(&second));
    let again = result.unwrap();
    assert_eq!(text, cold_text);
    assert_eq!(again.usage, cold_result.usage);
    assert_eq!(again.prompt_cached_tokens, 0);
}

#[test]
fn cancelling_one_of_four_mid_generation_leaves_the_others_exact() {
    let engine = engine(256, 4, 512);
    let reqs = (0..4)
        .map(|i| (request(&format!("story number {i}")), CancelFlag::new(), (i == 0).then_some(2)))
        .collect();
    let outcomes = together(&engine, reqs);
    let (text, result) = &outcomes[0];
    let completion = result.as_ref().unwrap();
    assert_eq!(completion.stop_reason, StopReason::Cancelled);
    assert_eq!(completion.usage.completion_tokens, 2);
    assert_eq!(text, " the quick");
    for (text, result) in &outcomes[1..] {
        assert_eq!(text, SENTENCE);
        assert_eq!(result.as_ref().unwrap().stop_reason, StopReason::End);
    }
    // The cancelled request's slot is free and still holds its prompt: sending it again
    // finds all of it there.
    let (text, result) = run(&engine, &request("story number 0"));
    let again = result.unwrap();
    assert_eq!(text, SENTENCE);
    assert_eq!(again.prompt_cached_tokens, again.usage.prompt_tokens - 1);
}

#[test]
fn cancelling_during_prefill_frees_the_slot_at_the_next_step() {
    let engine = engine(1024, 4, 16);
    let long = "once upon a time ".repeat(30);
    let long_cancel = CancelFlag::new();
    let steps = Arc::new(Mutex::new(Vec::new()));
    let (seen, flag) = (Arc::clone(&steps), long_cancel.clone());
    // Cancel the long request at the first step where the three short ones generate: its
    // prompt (hundreds of tokens, read 16 per step at most) is still being read then.
    engine.set_step_hook(Some(Box::new(move |step: &Step| {
        let mut seen = seen.lock().unwrap();
        seen.push(*step);
        if step.generating == 3 && !flag.is_cancelled() {
            assert_eq!(step.prefilling, 1, "the long prompt is still being read: {step:?}");
            flag.cancel();
        }
    })));
    let mut reqs = vec![(request(&long), long_cancel, None)];
    reqs.extend((0..3).map(|i| (request(&format!("hi {i}")), CancelFlag::new(), None)));
    let outcomes = together(&engine, reqs);
    let (text, result) = &outcomes[0];
    let cancelled = result.as_ref().unwrap();
    assert_eq!(cancelled.stop_reason, StopReason::Cancelled);
    assert_eq!(cancelled.usage.completion_tokens, 0);
    assert!(cancelled.usage.prompt_tokens > 200, "{cancelled:?}");
    assert_eq!(text, "");
    for (text, result) in &outcomes[1..] {
        assert_eq!(text, SENTENCE);
        assert_eq!(result.as_ref().unwrap().stop_reason, StopReason::End);
    }
    let steps = steps.lock().unwrap();
    let cancel_at = steps.iter().position(|s| s.generating == 3).unwrap();
    // From the step after the cancel, nothing reads a prompt any more.
    assert!(steps[cancel_at + 1..].iter().all(|s| s.prefilling == 0), "{steps:?}");
    drop(steps);

    // The slot holds the part of the prompt it read, and the next request with that
    // prompt takes it and reads only the rest.
    let (text, result) = run(&engine, &request(&long));
    let again = result.unwrap();
    assert_eq!(text, SENTENCE);
    assert!(again.prompt_cached_tokens > 0, "{again:?}");
    assert!(again.prompt_cached_tokens < again.usage.prompt_tokens - 1, "{again:?}");
}

#[test]
fn a_failed_batch_fails_its_requests_as_one_incident() {
    let engine = engine(256, 4, 512);
    let steps = record_steps(&engine);
    // Decode 1 reads the four prompts, decode 2 decodes their first tokens; llama.cpp
    // refuses decode 3, which holds all four.
    engine.fail_decode_after(2);
    let reqs =
        (0..4).map(|i| (request(&format!("doomed story {i}")), CancelFlag::new(), None)).collect();
    let mut incidents = Vec::new();
    for (text, result) in together(&engine, reqs) {
        let error = result.unwrap_err();
        assert_eq!(error.kind, EngineErrorKind::Unavailable, "{error:?}");
        assert!(error.message.contains("inconsistent"), "{error:?}");
        assert_eq!(text, " the quick", "two tokens came before the failure");
        incidents.push(error.incident.expect("an incident"));
    }
    assert!(incidents.iter().all(|&i| i == incidents[0]), "{incidents:?}");

    // The slots are usable again, with exactly the right text.
    for (text, result) in together(
        &engine,
        (0..4).map(|i| (request(&format!("story {i}")), CancelFlag::new(), None)).collect(),
    ) {
        assert_eq!(text, SENTENCE);
        assert_eq!(result.unwrap().stop_reason, StopReason::End);
    }
    // A later failure is another incident, even for one request: its prompt is read,
    // then the decode of its first token fails.
    engine.fail_decode_after(steps.lock().unwrap().len() as u64 + 1);
    let (text, result) = run(&engine, &request("one more"));
    let later = result.unwrap_err().incident.expect("an incident");
    assert_eq!(text, " the");
    assert_ne!(later, incidents[0]);
}

#[test]
fn a_cancel_that_interrupts_a_decode_leaves_the_others_exact() {
    // A cancel raised while a decode runs interrupts it (llama.cpp's abort callback); the
    // other sequences of that batch are decoded again, not failed. The cancel comes from
    // another thread just after the first step, when the second (three tokens and a
    // prompt chunk of about 250 tokens) starts: whether it lands inside that decode or before it,
    // the outcome must be the same.
    let engine = engine(1024, 4, 256);
    let long = "once upon a time ".repeat(60);
    for round in 0..6 {
        let cancel = CancelFlag::new();
        let (step_tx, step_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let mut calls = 0;
        // After the first step the canceller is let go; after the second the decode thread
        // waits for it, so the cancel lands during the second step at the latest.
        engine.set_step_hook(Some(Box::new(move |_: &Step| {
            calls += 1;
            if calls == 1 {
                let _ = step_tx.send(());
            } else if calls == 2 {
                let _ = done_rx.recv();
            }
        })));
        let canceller = {
            let cancel = cancel.clone();
            thread::spawn(move || {
                if step_rx.recv().is_ok() {
                    cancel.cancel();
                    let _ = done_tx.send(());
                }
            })
        };
        let mut reqs = vec![(request(&format!("{round} {long}")), cancel, None)];
        reqs.extend((0..3).map(|i| (request(&format!("hi {round} {i}")), CancelFlag::new(), None)));
        let outcomes = together(&engine, reqs);
        canceller.join().unwrap();
        let (text, result) = &outcomes[0];
        let cancelled = result.as_ref().unwrap();
        assert_eq!(cancelled.stop_reason, StopReason::Cancelled, "round {round}");
        assert_eq!(text, "");
        for (text, result) in &outcomes[1..] {
            assert_eq!(text, SENTENCE, "round {round}");
            assert_eq!(result.as_ref().unwrap().stop_reason, StopReason::End);
        }
    }
}

/// Opt-in: with `INFERD_TEST_MODEL=/path/to/model.gguf` (e.g. Gemma 3 270M from
/// `fetch-gemma3-270m.sh`), four concurrent requests and a resent second turn on a real
/// chat model. Without the variable it checks nothing.
#[test]
fn real_model_serves_concurrent_requests_and_reuses_prefixes() {
    let Some(path) = std::env::var_os("INFERD_TEST_MODEL") else { return };
    let config = LlamaConfig {
        n_ctx: 1024,
        n_parallel: 4,
        n_threads: 2,
        ..LlamaConfig::new(PathBuf::from(path))
    };
    let engine = Arc::new(LlamaEngine::new(config));
    engine.load(&mut |_| {}).expect("the model loads");
    let questions =
        ["What is the capital of France?", "Name a color.", "Count to five.", "Say hi."];
    let alone: Vec<Outcome> = questions
        .iter()
        .map(|q| run(&engine, &GenerateRequest { max_tokens: 24, ..request(q) }))
        .collect();
    let reqs = questions
        .iter()
        .map(|q| (GenerateRequest { max_tokens: 24, ..request(q) }, CancelFlag::new(), None))
        .collect();
    let together = together(&engine, reqs);
    assert_eq!(engine.largest_batch(), 4);
    for ((a, ra), (b, rb)) in alone.iter().zip(&together) {
        let (ra, rb) = (ra.as_ref().unwrap(), rb.as_ref().unwrap());
        eprintln!("alone {a:?} {ra:?}\ntogether {b:?} {rb:?}");
        assert!(!b.is_empty());
        assert_eq!(ra.usage.prompt_tokens, rb.usage.prompt_tokens);
    }
    let first = messages(&[questions[0]]);
    let (reply, _) =
        run(&engine, &GenerateRequest { messages: first, max_tokens: 24, ..request("") });
    let second = messages(&[questions[0], reply.trim(), "And of Italy?"]);
    let (text, result) =
        run(&engine, &GenerateRequest { messages: second, max_tokens: 24, ..request("") });
    let turn2 = result.unwrap();
    eprintln!("turn 2 {text:?} {turn2:?}");
    assert!(!text.is_empty());
}
