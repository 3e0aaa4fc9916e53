//! The llama.cpp engine against the committed tiny scripted model.

use std::path::PathBuf;
use std::sync::Arc;

use inferd_core::engine::{
    CancelFlag, Completion, Engine, EngineError, EngineErrorKind, GenerateRequest, LoadPhase,
    Message, Role, StopReason,
};
use inferd_engine_llama::{LlamaConfig, LlamaEngine, raw_generate};

const SENTENCE: &str = " the quick brown fox jumps over a lazy dog.";
const SHA256: &str = "a22fa22a53efcc1626c6b8c1c3438747f5a7eda4a0c95c8e6fdc25a8de9b190b";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-scripted.gguf")
}

fn config(n_ctx: u32) -> LlamaConfig {
    LlamaConfig { n_ctx, n_threads: 1, ..LlamaConfig::new(fixture()) }
}

fn loaded(n_ctx: u32) -> LlamaEngine {
    let engine = LlamaEngine::new(config(n_ctx));
    engine.load(&mut |_| {}).expect("the fixture loads");
    engine
}

fn request(content: &str) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message { role: Role::User, content: content.into() }],
        temperature: 0.0,
        ..GenerateRequest::default()
    }
}

fn run(engine: &LlamaEngine, req: &GenerateRequest) -> (String, Result<Completion, EngineError>) {
    let mut out = Vec::new();
    let result =
        engine.generate(req, &CancelFlag::new(), &mut |piece| out.extend_from_slice(piece));
    (String::from_utf8(out).expect("the output is UTF-8"), result)
}

/// A scratch file path unique to this test process.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("inferd-llama-{}-{name}", std::process::id()))
}

fn load_error(cfg: LlamaConfig) -> EngineError {
    LlamaEngine::new(cfg).load(&mut |_| {}).expect_err("the load fails")
}

#[test]
fn greedy_gives_the_sentence() {
    let engine = loaded(256);
    assert_eq!(engine.kind(), "llamacpp");
    let (text, result) = run(&engine, &request("Tell me a story"));
    let completion = result.unwrap();
    assert_eq!(text, SENTENCE);
    assert_eq!(completion.stop_reason, StopReason::End);
    assert_eq!(completion.usage.completion_tokens, 10);
    assert!(completion.usage.prompt_tokens > 1, "{completion:?}");
}

#[test]
fn pieces_are_streamed_one_per_token() {
    let engine = loaded(256);
    let mut pieces = Vec::new();
    let c = engine
        .generate(&request("hi"), &CancelFlag::new(), &mut |p| pieces.push(p.to_vec()))
        .unwrap();
    assert_eq!(pieces.len(), 10);
    assert_eq!(pieces[0], b" the");
    assert_eq!(pieces[9], b".");
    assert_eq!(c.usage.completion_tokens, 10);
}

#[test]
fn max_tokens_gives_length() {
    let engine = loaded(256);
    let (text, result) =
        run(&engine, &GenerateRequest { max_tokens: 3, ..request("Tell me a story") });
    let completion = result.unwrap();
    assert_eq!(text, " the quick brown");
    assert_eq!(completion.stop_reason, StopReason::Length);
    assert_eq!(completion.usage.completion_tokens, 3);

    let (text, result) = run(&engine, &GenerateRequest { max_tokens: 0, ..request("Tell me") });
    let completion = result.unwrap();
    assert_eq!(text, "");
    assert_eq!(completion.stop_reason, StopReason::Length);
    assert_eq!(completion.usage.completion_tokens, 0);
    assert!(completion.usage.prompt_tokens > 0);
}

#[test]
fn full_context_ends_with_length() {
    let engine = loaded(64);
    let (text, result) =
        run(&engine, &GenerateRequest { max_tokens: 100_000, ..request("say it again") });
    let completion = result.unwrap();
    assert_eq!(completion.stop_reason, StopReason::Length);
    let n = completion.usage.completion_tokens;
    assert!(n > 0);
    assert!(completion.usage.prompt_tokens + n <= 65, "{completion:?}");
    assert_eq!(text, " again".repeat(n as usize));
    // The engine still works afterwards.
    let (text, result) = run(&engine, &request("Tell me a story"));
    assert_eq!(text, SENTENCE);
    assert_eq!(result.unwrap().stop_reason, StopReason::End);
}

#[test]
fn prompt_longer_than_context_fails() {
    let engine = loaded(64);
    // Short enough in bytes to be tokenized, too long in tokens.
    let long = "word ".repeat(40);
    let (text, result) = run(&engine, &request(&long));
    let e = result.unwrap_err();
    assert_eq!(text, "");
    assert_eq!(e.kind, EngineErrorKind::InvalidRequest);
    assert!(e.message.contains("context is 64"), "{e}");
    assert!(e.message.starts_with("prompt is "), "{e}");
}

#[test]
fn non_ascii_prompt_works() {
    let engine = loaded(256);
    let (text, result) = run(&engine, &request("héllo wörld 你好 🦀"));
    let completion = result.unwrap();
    assert_eq!(text, SENTENCE);
    assert_eq!(completion.stop_reason, StopReason::End);
}

#[test]
fn several_messages_work() {
    let engine = loaded(256);
    let req = GenerateRequest {
        messages: vec![
            Message { role: Role::System, content: "be brief".into() },
            Message { role: Role::User, content: "hi".into() },
            Message { role: Role::Assistant, content: "hello".into() },
            Message { role: Role::User, content: "a story please".into() },
        ],
        ..request("")
    };
    let (text, result) = run(&engine, &req);
    assert_eq!(text, SENTENCE);
    assert_eq!(result.unwrap().usage.completion_tokens, 10);
}

#[test]
fn cancel_mid_stream_then_serve_again() {
    let engine = loaded(256);
    let cancel = CancelFlag::new();
    let mut pieces = Vec::new();
    let completion = engine
        .generate(&request("Tell me a story"), &cancel, &mut |piece| {
            pieces.push(piece.to_vec());
            if pieces.len() == 2 {
                cancel.cancel();
            }
        })
        .unwrap();
    assert_eq!(completion.stop_reason, StopReason::Cancelled);
    assert_eq!(pieces.len(), 2);
    assert_eq!(completion.usage.completion_tokens, 2);
    assert_eq!(pieces.concat(), b" the quick");

    let (text, result) = run(&engine, &request("Tell me a story"));
    assert_eq!(text, SENTENCE);
    assert_eq!(result.unwrap().stop_reason, StopReason::End);
}

#[test]
fn cancel_before_start() {
    let engine = loaded(256);
    let cancel = CancelFlag::new();
    cancel.cancel();
    let mut n = 0;
    let c = engine.generate(&request("x"), &cancel, &mut |_| n += 1).unwrap();
    assert_eq!(n, 0);
    assert_eq!(c.stop_reason, StopReason::Cancelled);
    assert_eq!(c.usage.completion_tokens, 0);
}

#[test]
fn concurrent_requests_are_served() {
    let engine = Arc::new(loaded(256));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || run(&engine, &request("Tell me a story")))
        })
        .collect();
    for t in threads {
        let (text, result) = t.join().unwrap();
        assert_eq!(text, SENTENCE);
        assert_eq!(result.unwrap().usage.completion_tokens, 10);
    }
}

#[test]
fn generate_before_load_is_unavailable() {
    let engine = LlamaEngine::new(config(256));
    let (_, result) = run(&engine, &request("x"));
    assert_eq!(result.unwrap_err().kind, EngineErrorKind::Unavailable);
}

#[test]
fn load_reports_phases() {
    let engine = LlamaEngine::new(LlamaConfig { model_sha256: Some(SHA256.into()), ..config(128) });
    let mut phases = Vec::new();
    let caps = engine.load(&mut |p| phases.push(p)).unwrap();
    let path = fixture().display().to_string();
    assert_eq!(
        phases,
        vec![
            LoadPhase::CheckingLocal { path: path.clone() },
            LoadPhase::Verify { path: path.clone() },
            LoadPhase::Mmap { path },
            LoadPhase::KvCache { n_ctx: 128 },
        ]
    );
    assert_eq!(caps.accelerator, "cpu");
    assert!(!caps.vision);
    // A second load is refused; the engine keeps serving.
    assert!(engine.load(&mut |_| {}).is_err());
    assert_eq!(run(&engine, &request("x")).0, SENTENCE);
}

#[test]
fn zero_n_ctx_takes_the_training_context() {
    let engine = LlamaEngine::new(config(0));
    let mut phases = Vec::new();
    engine.load(&mut |p| phases.push(p)).unwrap();
    assert!(phases.contains(&LoadPhase::KvCache { n_ctx: 4096 }), "{phases:?}");
}

#[test]
fn bad_paths_fail_to_load() {
    let e = load_error(LlamaConfig::new("/nonexistent/model.gguf"));
    assert!(e.message.contains("/nonexistent/model.gguf"), "{e}");
    let e = load_error(LlamaConfig::new(std::env::temp_dir()));
    assert!(e.message.contains("not a regular file"), "{e}");
}

#[test]
fn truncated_or_garbage_files_fail_with_llama_cpp_reason() {
    let model = std::fs::read(fixture()).unwrap();
    for (name, bytes) in [
        ("truncated-half", model[..model.len() / 2].to_vec()),
        ("truncated-header", model[..100].to_vec()),
        ("truncated-tail", model[..model.len() - 1].to_vec()),
        ("garbage", b"this is not a gguf file at all, just some text".repeat(10)),
        ("empty", Vec::new()),
    ] {
        let path = scratch(name);
        std::fs::write(&path, &bytes).unwrap();
        let e = load_error(LlamaConfig { n_threads: 1, ..LlamaConfig::new(&path) });
        std::fs::remove_file(&path).unwrap();
        assert_eq!(e.kind, EngineErrorKind::Unavailable);
        assert!(e.message.contains("cannot load model"), "{name}: {e}");
        assert!(e.message.contains("llama.cpp: "), "{name}: no reason quoted: {e}");
    }
}

#[test]
fn sha256_is_checked() {
    let wrong = "0".repeat(64);
    let e = load_error(LlamaConfig { model_sha256: Some(wrong.clone()), ..config(128) });
    assert!(e.message.contains(&wrong), "{e}");
    assert!(e.message.contains(SHA256), "{e}");

    let engine =
        LlamaEngine::new(LlamaConfig { model_sha256: Some(SHA256.to_uppercase()), ..config(128) });
    engine.load(&mut |_| {}).unwrap();
    assert_eq!(run(&engine, &request("Tell me a story")).0, SENTENCE);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let engine = loaded(256);
    let req = GenerateRequest { temperature: 1.0, seed: Some(42), ..request("Tell me a story") };
    let (a, ra) = run(&engine, &req);
    let (b, rb) = run(&engine, &req);
    assert_eq!(a, b);
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.usage, ra.stop_reason), (rb.usage, rb.stop_reason));
    // The second run found all but the last prompt token cached, and sampled the same.
    assert_eq!(ra.prompt_cached_tokens, 0);
    assert_eq!(rb.prompt_cached_tokens, rb.usage.prompt_tokens - 1);
    // Another engine, same seed: same output.
    let (c, _) = run(&loaded(256), &req);
    assert_eq!(a, c);
}

#[test]
fn grammar_constrains_output() {
    let engine = loaded(256);
    let req = GenerateRequest { grammar: r#"root ::= " the quick""#.into(), ..request("Tell me") };
    let (text, result) = run(&engine, &req);
    let completion = result.unwrap();
    assert_eq!(text, " the quick");
    assert_eq!(completion.stop_reason, StopReason::End);

    // A grammar the model would not follow on its own: forced anyway.
    let req = GenerateRequest { grammar: r#"root ::= "ok" [0-9]"#.into(), ..request("Tell me") };
    let (text, result) = run(&engine, &req);
    assert_eq!(result.unwrap().stop_reason, StopReason::End);
    assert!(text.starts_with("ok") && text.len() == 3, "{text:?}");

    // Sampling with a grammar.
    let req = GenerateRequest {
        grammar: r#"root ::= (" the" | " quick")+"#.into(),
        temperature: 1.0,
        seed: Some(1),
        max_tokens: 5,
        ..request("Tell me")
    };
    let (text, result) = run(&engine, &req);
    result.unwrap();
    assert!(text.starts_with(" the") || text.starts_with(" quick"), "{text:?}");
}

#[test]
fn invalid_grammar_is_an_error() {
    let engine = loaded(256);
    for grammar in ["root ::= (", "this is not gbnf", "start ::= \"a\"", "root ::= undefined-rule"]
    {
        let req = GenerateRequest { grammar: grammar.into(), ..request("Tell me") };
        let (text, result) = run(&engine, &req);
        let e = result.unwrap_err();
        assert_eq!(text, "");
        assert_eq!(e.kind, EngineErrorKind::InvalidRequest);
        assert!(e.message.contains("invalid grammar"), "{grammar}: {e}");
    }
    // The engine still serves.
    assert_eq!(run(&engine, &request("Tell me a story")).0, SENTENCE);
}

#[test]
fn raw_generate_matches_the_engine() {
    let messages = [Message { role: Role::User, content: "Tell me a story".into() }];
    let raw = raw_generate(&config(256), &messages, 100, 0.0, None).unwrap();
    assert_eq!(raw.bytes, SENTENCE.as_bytes());
    assert_eq!(raw.n_tokens, 10);
    assert_eq!(raw.stop_reason, StopReason::End);
    assert!(raw.first_token.is_some());

    let engine = loaded(256);
    let req = GenerateRequest { temperature: 1.0, seed: Some(9), ..request("Tell me a story") };
    let (text, result) = run(&engine, &req);
    let raw = raw_generate(&config(256), &req.messages, req.max_tokens, 1.0, Some(9)).unwrap();
    assert_eq!(raw.bytes, text.as_bytes());
    assert_eq!(raw.n_tokens, result.unwrap().usage.completion_tokens);
}

#[test]
fn hostile_grammars_do_not_crash() {
    let engine = loaded(256);
    // Needs the end-of-generation token before the grammar is complete: no token is allowed.
    let req = GenerateRequest { grammar: "root ::= <[2]>".into(), ..request("x") };
    let e = run(&engine, &req).1.unwrap_err();
    assert!(e.message.contains("grammar allows no token"), "{e}");
    // Left recursion is refused by llama.cpp with a logged reason.
    let req = GenerateRequest { grammar: "root ::= root \"a\"".into(), ..request("x") };
    let e = run(&engine, &req).1.unwrap_err();
    assert!(e.message.contains("left recursion"), "{e}");
    // Deep nesting, as large as the protocol allows, parses on the worker's stack.
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(30_000), ")".repeat(30_000));
    let req = GenerateRequest { grammar: deep, ..request("x") };
    let (text, result) = run(&engine, &req);
    assert_eq!(text, "a");
    assert_eq!(result.unwrap().stop_reason, StopReason::End);
}

#[test]
fn empty_message_still_generates() {
    let engine = loaded(256);
    let (text, result) = run(&engine, &request(""));
    let completion = result.unwrap();
    assert_eq!(text, SENTENCE);
    assert_eq!(completion.usage.prompt_tokens, 1, "just the BOS token");
}

/// Grammars a hostile client might send: none parses, each carries secrets and a forged
/// log line.
const SECRET_GRAMMARS: [&str; 4] = [
    "root ::= \"a\" ; api_key=sk-proj-abcdefghijklmnopqrstuv password=hunter2\ninferd: forged",
    "root ::= ( \"api_key=sk-proj-abcdefghijklmnopqrstuv\"\ninferd: forged hunter2",
    "root ::= [a-\ninferd: forged sk-proj-abcdefghijklmnopqrstuv hunter2",
    "root ::= undefined-rule\n# sk-proj-abcdefghijklmnopqrstuv hunter2\ninferd: forged",
];

/// Runs only as the child of `invalid_grammars_never_reach_stderr`.
#[test]
fn child_sends_secret_grammars() {
    if std::env::var_os("INFERD_TEST_GRAMMAR_CHILD").is_none() {
        return;
    }
    let engine = loaded(256);
    for grammar in SECRET_GRAMMARS {
        let req = GenerateRequest { grammar: grammar.into(), ..request("Tell me") };
        let e = run(&engine, &req).1.unwrap_err();
        assert_eq!(e.kind, EngineErrorKind::InvalidRequest, "{e}");
    }
    eprintln!("child done");
}

#[test]
fn invalid_grammars_never_reach_stderr() {
    // llama.cpp prints grammars it cannot parse straight to stderr, so the check runs in
    // a child process whose stderr is captured.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_sends_secret_grammars", "--nocapture", "--test-threads=1"])
        .env("INFERD_TEST_GRAMMAR_CHILD", "1")
        .env_remove("INFERD_LLAMA_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stderr}");
    assert!(stderr.contains("child done"), "the child ran: {stderr}");
    for secret in ["sk-proj-", "hunter2", "inferd: forged"] {
        assert!(!stderr.contains(secret), "{secret:?} reached stderr: {stderr}");
    }
}

#[test]
fn a_prompt_too_long_in_bytes_is_refused_before_tokenizing() {
    let engine = loaded(64);
    // Megabytes of text outside the vocabulary (byte-fallback tokens): tokenizing it all
    // would be slow; its length alone shows it cannot fit.
    let huge = "你好🦀".repeat(300_000);
    let (text, result) = run(&engine, &request(&huge));
    let e = result.unwrap_err();
    assert_eq!(text, "");
    assert_eq!(e.kind, EngineErrorKind::InvalidRequest);
    assert!(e.message.contains("bytes, more than a context of 64 tokens can hold"), "{e}");
    // The engine still serves.
    assert_eq!(run(&engine, &request("Tell me a story")).0, SENTENCE);
}
