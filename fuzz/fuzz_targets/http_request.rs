//! Fuzz target `http_request`: the check lives in `inferd_proptests::http::fuzz_http_request`,
//! which `proptests/tests/corpus_replay.rs` also runs over the saved corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| inferd_proptests::http::fuzz_http_request(data));
