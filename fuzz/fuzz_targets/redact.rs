//! Fuzz target `redact`: the check lives in `inferd_proptests::fuzz_redact`, which
//! `proptests/tests/corpus_replay.rs` also runs over the saved corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| inferd_proptests::fuzz_redact(data));
