//! The HTTP request reader: the same events for any chunking of any byte stream (made
//! of plausible requests, pieces of them, and noise), with the limits holding as bytes
//! arrive; and well-formed request streams come out request by request.

use inferd_core::http::request::{Event, Limits};
use inferd_proptests::http::check_request_reader;
use proptest::prelude::*;

/// One request, well-formed or slightly off.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![Just("GET"), Just("POST"), Just("PUT")];
    let version = prop_oneof![4 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0"), 1 => Just("HTTP/2.0")];
    let header = prop_oneof![
        Just("Connection: close".to_owned()),
        Just("Connection: keep-alive".to_owned()),
        Just("Transfer-Encoding: chunked".to_owned()),
        Just("Expect: 100-continue".to_owned()),
        Just("Authorization: Bearer k".to_owned()),
        Just("X-Pad: aaaaaaaaaaaaaaaaaaaa".to_owned()),
        Just("Content-Length: x".to_owned()),
        Just("bad header".to_owned()),
        (0usize..40).prop_map(|n| format!("Content-Length: {n}")),
    ];
    (
        method,
        version,
        proptest::collection::vec(header, 0..4),
        proptest::collection::vec(any::<u8>(), 0..40),
        any::<bool>(),
    )
        .prop_map(|(m, v, headers, body, lf_only)| {
            let eol = if lf_only { "\n" } else { "\r\n" };
            let mut s = format!("{m} /p {v}{eol}");
            for h in &headers {
                s.push_str(h);
                s.push_str(eol);
            }
            s.push_str(eol);
            let mut out = s.into_bytes();
            out.extend_from_slice(&body);
            out
        })
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    let part = prop_oneof![
        6 => request(),
        1 => Just(b"\r\n".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..20),
    ];
    proptest::collection::vec(part, 0..6).prop_map(|v| v.concat())
}

fn limits() -> impl Strategy<Value = Limits> {
    (8usize..200, 0usize..6, 0usize..50).prop_map(|(h, n, b)| Limits {
        max_head_bytes: h,
        max_headers: n,
        max_body_bytes: b,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn same_events_for_any_chunking(
        s in stream(), limits in limits(), chunks in proptest::collection::vec(1usize..30, 1..10)
    ) {
        let whole = check_request_reader(&s, limits, &[s.len()]);
        prop_assert_eq!(&check_request_reader(&s, limits, &chunks), &whole);
        prop_assert_eq!(&check_request_reader(&s, limits, &[1]), &whole);
    }

    #[test]
    fn pipelined_requests_come_out_one_by_one(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..30), 1..8),
        chunks in proptest::collection::vec(1usize..30, 1..10)
    ) {
        let mut s = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            s.extend_from_slice(format!("POST /r{i} HTTP/1.1\r\nContent-Length: {}\r\n\r\n", b.len()).as_bytes());
            s.extend_from_slice(b);
        }
        let events = check_request_reader(&s, Limits::with_max_body(64), &chunks);
        prop_assert_eq!(events.len(), 2 * bodies.len());
        for (i, pair) in events.chunks(2).enumerate() {
            match pair {
                [Event::Head(h), Event::Body(b)] => {
                    prop_assert_eq!(&h.path, &format!("/r{i}"));
                    prop_assert!(h.keep_alive);
                    prop_assert_eq!(b, &bodies[i]);
                }
                other => prop_assert!(false, "unexpected events {:?}", other),
            }
        }
    }
}
