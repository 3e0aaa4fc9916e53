//! The OpenAI API's built-in JSON grammar (`response_format: {"type":"json_object"}`)
//! run by llama.cpp on the committed tiny model: it is accepted, and what it lets
//! through is a JSON object.

use std::path::PathBuf;

use inferd_core::engine::{CancelFlag, Engine, GenerateRequest, Message, Role, StopReason};
use inferd_core::http::openai::JSON_OBJECT_GRAMMAR;
use inferd_engine_llama::{LlamaConfig, LlamaEngine};

fn engine() -> LlamaEngine {
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-scripted.gguf");
    let engine =
        LlamaEngine::new(LlamaConfig { n_ctx: 512, n_threads: 1, ..LlamaConfig::new(model) });
    engine.load(&mut |_| {}).expect("the fixture loads");
    engine
}

fn request(temperature: f32, seed: Option<u64>) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message { role: Role::User, content: "Reply in JSON".into() }],
        temperature,
        seed,
        max_tokens: 300,
        grammar: JSON_OBJECT_GRAMMAR.into(),
        ..GenerateRequest::default()
    }
}

#[test]
fn json_object_grammar_yields_json_objects() {
    let engine = engine();
    let mut finished = 0;
    for (temperature, seed) in [(0.0, None), (1.0, Some(1)), (1.0, Some(2)), (1.0, Some(3))] {
        let mut out = Vec::new();
        let result = engine
            .generate(&request(temperature, seed), &CancelFlag::new(), &mut |p| {
                out.extend_from_slice(p)
            })
            .expect("llama.cpp accepts the grammar");
        let text = String::from_utf8(out).expect("UTF-8 output");
        assert!(text.starts_with('{'), "{text:?}");
        if result.stop_reason == StopReason::End {
            finished += 1;
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
            assert!(v.is_object(), "{text:?}");
        }
    }
    assert!(finished > 0, "no generation completed its object within max_tokens");
}
