//! The request decoder: never panics, whatever the bytes or the JSON; valid requests
//! decode to exactly what was generated; the two classes of bad input are told apart.

use inferd_core::engine::{GenerateRequest, Message, Role};
use inferd_core::wire::{self, DecodeError, IMAGE_TOKEN_BUDGETS, Request};
use inferd_proptests::check_decoded_request;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const KEYS: &[&str] = &[
    "id",
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "stream",
    "image_token_budget",
    "grammar",
    "seed",
    "role",
    "content",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![3 => proptest::sample::select(KEYS).prop_map(String::from), 1 => "[a-z_]{1,8}"]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(|f| json!(f)),
        proptest::sample::select(&[0.0, -0.0, 1e-300, 0.5, 1.0, 1.5, 1e39, f64::MAX][..])
            .prop_map(|f| json!(f)),
        proptest::sample::select(&["user", "system", "assistant", "robot", "", "é"][..])
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::System), Just(Role::User), Just(Role::Assistant)]
}

/// A valid request as generated, and the JSON line for it.
#[derive(Debug, Clone)]
struct Valid {
    line: Vec<u8>,
    want: Request,
}

fn valid() -> impl Strategy<Value = Valid> {
    let a = (
        proptest::option::of(any::<String>()),
        proptest::collection::vec((role(), any::<String>()), 1..4),
        proptest::option::of(0.0f64..100.0),
        proptest::option::of(1e-6f64..=1.0),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
    );
    let b = (
        proptest::option::of(any::<bool>()),
        proptest::option::of(proptest::sample::select(&IMAGE_TOKEN_BUDGETS[..])),
        proptest::option::of("[a-z |:=\"]{0,40}"),
        proptest::option::of(any::<u64>()),
        proptest::option::of(("x_[a-z]{1,6}", json())),
    );
    (a, b).prop_map(
        |((id, msgs, temp, top_p, top_k, max_tokens), (stream, budget, grammar, seed, extra))| {
            let messages: Vec<Message> =
                msgs.into_iter().map(|(role, content)| Message { role, content }).collect();
            let mut m = Map::new();
            let d = GenerateRequest::default();
            let mut want = Request {
                id: id.clone().unwrap_or_default(),
                stream: stream.unwrap_or(true),
                params: GenerateRequest { messages: messages.clone(), ..d },
                stop: Vec::new(),
            };
            if let Some(id) = id {
                m.insert("id".into(), id.into());
            }
            m.insert("messages".into(), serde_json::to_value(&messages).unwrap());
            if let Some(t) = temp {
                m.insert("temperature".into(), json!(t));
                want.params.temperature = t as f32;
            }
            if let Some(p) = top_p {
                m.insert("top_p".into(), json!(p));
                want.params.top_p = p as f32;
            }
            if let Some(k) = top_k {
                m.insert("top_k".into(), json!(k));
                want.params.top_k = k;
            }
            if let Some(n) = max_tokens {
                m.insert("max_tokens".into(), json!(n));
                want.params.max_tokens = n;
            }
            if let Some(s) = stream {
                m.insert("stream".into(), json!(s));
            }
            if let Some(b) = budget {
                m.insert("image_token_budget".into(), json!(b));
                want.params.image_token_budget = Some(b);
            }
            if let Some(g) = grammar {
                m.insert("grammar".into(), json!(g));
                want.params.grammar = g;
            }
            if let Some(s) = seed {
                m.insert("seed".into(), json!(s));
                want.params.seed = Some(s);
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Valid { line: serde_json::to_vec(&Value::Object(m)).unwrap(), want }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_decoded_request(&bytes);
    }

    #[test]
    fn never_panics_on_json(v in json()) {
        let line = serde_json::to_vec(&v).unwrap();
        check_decoded_request(&line);
        if !v.is_object() {
            let e = wire::decode_request(&line).unwrap_err();
            prop_assert!(e.closes_connection(), "a non-object is undecodable");
            prop_assert_eq!(e.id(), "");
        }
    }

    #[test]
    fn request_shaped_objects(
        fields in proptest::collection::vec((key(), json()), 0..8),
        msgs in proptest::option::of(proptest::collection::vec(json(), 0..4)),
    ) {
        let mut m: Map<String, Value> = fields.into_iter().collect();
        if let Some(msgs) = msgs {
            m.insert("messages".into(), Value::Array(msgs));
        }
        let messages_ok = matches!(m.get("messages"), Some(Value::Array(_)));
        let line = serde_json::to_vec(&Value::Object(m)).unwrap();
        check_decoded_request(&line);
        if !messages_ok {
            let e = wire::decode_request(&line).unwrap_err();
            prop_assert!(e.closes_connection(), "missing or mistyped messages is undecodable: {e:?}");
        }
    }

    #[test]
    fn valid_requests_decode_to_what_was_generated(v in valid()) {
        let got = wire::decode_request(&v.line);
        prop_assert_eq!(got, Ok(v.want));
    }

    #[test]
    fn out_of_range_values_keep_the_connection(
        v in valid(),
        which in 0u8..7,
        x in any::<i32>(),
    ) {
        let mut m: Map<String, Value> = serde_json::from_slice(&v.line).unwrap();
        let id = v.want.id.clone();
        match which {
            0 => { m.insert("messages".into(), json!([])); }
            1 => { m.insert("temperature".into(), json!(-1.0 - f64::from(x.unsigned_abs()))); }
            2 => { m.insert("top_p".into(), json!(0)); }
            3 => { m.insert("top_p".into(), json!(1.0 + 1.0 / (1.0 + f64::from(x.unsigned_abs())))); }
            4 => { m.insert("top_k".into(), json!(-1 - i64::from(x.unsigned_abs()))); }
            5 => { m.insert("max_tokens".into(), json!(-1 - i64::from(x.unsigned_abs()))); }
            _ => {
                let b = x.unsigned_abs();
                prop_assume!(!IMAGE_TOKEN_BUDGETS.contains(&b));
                m.insert("image_token_budget".into(), json!(b));
            }
        }
        let line = serde_json::to_vec(&Value::Object(m)).unwrap();
        match wire::decode_request(&line) {
            Err(DecodeError::Invalid { id: got, .. }) => prop_assert_eq!(got, id),
            other => prop_assert!(false, "expected Invalid, got {:?}", other),
        }
    }

    #[test]
    fn duplicate_keys_are_undecodable(v in valid(), k in proptest::sample::select(&KEYS[..10])) {
        let mut line = v.line.clone();
        line.pop(); // the closing brace
        line.extend_from_slice(format!(r#","{k}":null}}"#).as_bytes());
        let m: Map<String, Value> = serde_json::from_slice(&v.line).unwrap();
        prop_assume!(m.contains_key(k));
        let e = wire::decode_request(&line).unwrap_err();
        prop_assert!(e.closes_connection(), "{:?}", e);
    }

    /// Sampling values are validated as f64 but handed to engines as f32: a value
    /// inside the f64 range must still be inside it after narrowing.
    #[test]
    fn sampling_values_survive_narrowing(t in 0.0f64..1e308, p in 1e-300f64..1e-40) {
        let line = json!({"messages":[{"role":"user","content":"x"}], "temperature": t}).to_string();
        check_decoded_request(line.as_bytes());
        let line = json!({"messages":[{"role":"user","content":"x"}], "top_p": p}).to_string();
        check_decoded_request(line.as_bytes());
    }
}
