//! Fuzz target `sse`: the check lives in `inferd_proptests::sse::fuzz_sse`, which
//! `proptests/tests/corpus_replay.rs` also runs over the saved corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| inferd_proptests::sse::fuzz_sse(data));
