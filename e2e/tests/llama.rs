//! The llama.cpp engine through the daemon, with the committed tiny scripted model, and
//! an opt-in smoke test with a real model (INFERD_GEMMA_MODEL).

use std::time::{Duration, Instant};

use inferd_e2e::*;

both_shells!(
    llama_greedy_and_max_tokens,
    llama_context_fills_with_length,
    llama_cancel_mid_stream_frees_the_engine,
    llama_bad_models_are_refused,
    llama_wrong_sha256_is_refused,
    gemma_smoke,
);

const SENTENCE: &str = " the quick brown fox jumps over a lazy dog.";

fn llama(shell: Shell, n_ctx: u32) -> DaemonBuilder {
    shell.daemon().backend("llamacpp").arg("--model-path").arg(tiny_model()).args([
        "--n-threads",
        "1",
        "--n-ctx",
        &n_ctx.to_string(),
    ])
}

/// Greedy output is the scripted sentence (`end`, 10 tokens); `max_tokens` cuts it
/// (`length`); a non-ASCII prompt works; seeded sampling is reproducible.
fn llama_greedy_and_max_tokens(shell: Shell) {
    let d = llama(shell, 256).start();
    let mut c = d.connect();
    c.send(&req_with("g", "Tell me a story", json!({"temperature": 0})));
    let r = c.read_reply();
    let (content, stop, usage) = r.done();
    assert_eq!(content, SENTENCE);
    assert_eq!(r.streamed(), SENTENCE);
    assert_eq!(stop, StopReason::End);
    assert_eq!(usage.completion_tokens, 10);
    assert!(usage.prompt_tokens > 0);
    match &r.terminal {
        Frame::Done { backend, .. } => assert_eq!(backend, "llamacpp"),
        _ => unreachable!(),
    }

    c.send(&req_with("m", "Tell me a story", json!({"temperature": 0, "max_tokens": 3})));
    let r = c.read_reply();
    let (content, stop, usage) = r.done();
    assert_eq!(r.tokens.len(), 3);
    assert_eq!(usage.completion_tokens, 3);
    assert_eq!(stop, StopReason::Length);
    assert!(SENTENCE.starts_with(content), "{content:?}");

    c.send(&req_with("u", "héllo wörld — 日本語 🦀 ñ", json!({"temperature": 0})));
    let r = c.read_reply();
    assert_eq!(r.done().0, SENTENCE);

    let seeded = json!({"temperature": 1, "seed": 42});
    c.send(&req_with("s1", "Tell me a story", seeded.clone()));
    let a = c.read_reply();
    c.send(&req_with("s2", "Tell me a story", seeded));
    let b = c.read_reply();
    assert_eq!(a.done().0, b.done().0, "seeded sampling differs");
    assert!(!a.done().0.is_empty());
}

/// A prompt ending in "again" repeats until the 64-token context is full: `length`.
fn llama_context_fills_with_length(shell: Shell) {
    let d = llama(shell, 64).start();
    let r = d.ask(&req_with("c", "say it again", json!({"temperature": 0, "max_tokens": 1000})));
    let (content, stop, usage) = r.done();
    assert_eq!(stop, StopReason::Length);
    assert!(content.starts_with(" again again"), "{content:?}");
    // Every token but the last is decoded into the context; the last is sampled from
    // the final position's logits, so the total may be one more than the context.
    assert!(
        usage.prompt_tokens + usage.completion_tokens <= 64 + 1,
        "more tokens than the context holds: {usage:?}"
    );
    assert!(usage.completion_tokens > 10, "{usage:?}");
}

/// Disconnecting after the first token of a long generation stops it: a request on a
/// new connection gets the whole sentence right after, and the log says `cancelled`.
fn llama_cancel_mid_stream_frees_the_engine(shell: Shell) {
    // With 2048 tokens of context the "again" generation takes seconds; it is cut
    // after its first token.
    let mut d = llama(shell, 2048).start();
    let mut c = d.connect();
    c.send(&req_with("long", "again and again", json!({"temperature": 0, "max_tokens": 100000})));
    assert!(matches!(c.next_frame(), Ok(Frame::Token { .. })));
    drop(c);
    let t = Instant::now();
    let r = d.ask(&req_with("next", "Tell me a story", json!({"temperature": 0})));
    assert_eq!(r.done().0, SENTENCE);
    eprintln!("{shell}: next request served {:?} after the cancel", t.elapsed());
    assert!(d.terminate().success());
    let records = d.log_records();
    let long = records
        .iter()
        .find(|r| r["msg"] == "request_done" && r["req_id"] == "long")
        .unwrap_or_else(|| panic!("no request_done for the cancelled request:\n{}", d.log_text()));
    assert_eq!(long["stop_reason"], "cancelled", "{long}");
    assert!(long["completion_tokens"].as_u64().unwrap_or(0) < 2000, "{long}");
    // The engine's own account of the cancelled generation completes the record.
    assert!(long["prompt_tokens"].as_u64().is_some_and(|n| n > 0), "{long}");
    assert!(long["ttft_ms"].is_u64(), "{long}");
}

fn serve_llama(shell: Shell, tmp: &TempDir, model: &std::path::Path, extra: &[&str]) -> Output {
    run(
        shell
            .command(tmp)
            .args(["serve", "--backend", "llamacpp", "--n-threads", "1", "--n-ctx", "256"])
            .arg("--runtime-dir")
            .arg(tmp.join("run"))
            .arg("--log-dir")
            .arg(tmp.join("logs"))
            .arg("--model-path")
            .arg(model)
            .args(extra),
        Duration::from_secs(60),
    )
}

/// A missing model, a file that is not GGUF and a truncated copy of the model: `serve`
/// exits non-zero with the reason.
fn llama_bad_models_are_refused(shell: Shell) {
    let tmp = TempDir::new("badmodel");
    let missing = tmp.join("no-such-model.gguf");
    let out = serve_llama(shell, &tmp, &missing, &[]);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("no-such-model.gguf"), "{out:?}");
    assert!(out.stderr.contains("No such file"), "{out:?}");

    let not_gguf = tmp.join("not-a-model.gguf");
    std::fs::write(&not_gguf, "this is not a GGUF file\n".repeat(100)).unwrap();
    let out = serve_llama(shell, &tmp, &not_gguf, &[]);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("llama.cpp"), "llama.cpp's reason expected: {out:?}");

    let model = std::fs::read(tiny_model()).unwrap();
    let truncated = tmp.join("truncated.gguf");
    std::fs::write(&truncated, &model[..model.len() / 3]).unwrap();
    let out = serve_llama(shell, &tmp, &truncated, &[]);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("llama.cpp"), "llama.cpp's reason expected: {out:?}");
    assert!(
        out.stderr.contains("corrupted or incomplete") || out.stderr.contains("failed to"),
        "{out:?}"
    );
    assert!(!tmp.join("run/infer.sock").exists());
}

/// A wrong `--model-sha256` is refused with both hashes in the message; the right one
/// (in either case) is accepted.
fn llama_wrong_sha256_is_refused(shell: Shell) {
    const ACTUAL: &str = "a22fa22a53efcc1626c6b8c1c3438747f5a7eda4a0c95c8e6fdc25a8de9b190b";
    let wrong = "0123456789abcdef".repeat(4);
    let tmp = TempDir::new("sha");
    let out = serve_llama(shell, &tmp, &tiny_model(), &["--model-sha256", &wrong]);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains(&wrong), "expected hash missing: {out:?}");
    assert!(out.stderr.contains(ACTUAL), "actual hash missing: {out:?}");

    let d = llama(shell, 256).args(["--model-sha256", &ACTUAL.to_uppercase()]).start();
    let r = d.ask(&req_with("ok", "hi", json!({"temperature": 0})));
    assert_eq!(r.done().0, SENTENCE);
}

/// Opt-in: `INFERD_GEMMA_MODEL=/path/to/gemma-3-270m.gguf` (see
/// /work/shared/models/fetch-gemma3-270m.sh). Skipped when unset.
fn gemma_smoke(shell: Shell) {
    let Some(model) = std::env::var_os("INFERD_GEMMA_MODEL") else {
        eprintln!("{shell}: gemma_smoke skipped: INFERD_GEMMA_MODEL is not set");
        return;
    };
    let d = shell
        .daemon()
        .backend("llamacpp")
        .arg("--model-path")
        .arg(&model)
        .args(["--n-threads", "1", "--n-ctx", "1024"])
        .start();
    let mut c = d.connect();
    c.set_read_timeout(Duration::from_secs(120));
    c.send(&req_with(
        "gemma",
        "What is the capital of France?",
        json!({"max_tokens": 32, "temperature": 0}),
    ));
    let r = c.read_reply();
    let (content, _stop, usage) = r.done();
    eprintln!("{shell}: gemma says {content:?} ({usage:?})");
    assert!(content.chars().filter(|c| c.is_alphabetic()).count() >= 3, "{content:?}");
    assert!(usage.completion_tokens > 0 && usage.completion_tokens <= 32, "{usage:?}");
    assert_eq!(content, r.streamed());
}
