//! Replays the fuzz corpora (and any local crash artifacts) through the same checks the
//! fuzz targets run, on the stable toolchain with a plain `cargo test`.

use std::path::{Path, PathBuf};

type Check = fn(&[u8]);

const TARGETS: &[(&str, Check)] = &[
    ("line_decoder", inferd_proptests::fuzz_line_decoder),
    ("request_decoder", inferd_proptests::fuzz_request_decoder),
    ("config_parser", inferd_proptests::fuzz_config_parser),
    ("admin_frames", inferd_proptests::fuzz_admin_frames),
    ("daemon", inferd_proptests::fuzz_daemon),
    ("http_request", inferd_proptests::http::fuzz_http_request),
    ("redact", inferd_proptests::fuzz_redact),
    ("sse", inferd_proptests::sse::fuzz_sse),
];

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str, check: Check) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no corpus for fuzz target {target}: fuzz/corpus/{target} is missing"
    );
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs fail: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn line_decoder() {
    replay(TARGETS[0].0, TARGETS[0].1);
}

#[test]
fn request_decoder() {
    replay(TARGETS[1].0, TARGETS[1].1);
}

#[test]
fn config_parser() {
    replay(TARGETS[2].0, TARGETS[2].1);
}

#[test]
fn admin_frames() {
    replay(TARGETS[3].0, TARGETS[3].1);
}

#[test]
fn daemon() {
    replay(TARGETS[4].0, TARGETS[4].1);
}

#[test]
fn http_request() {
    replay(TARGETS[5].0, TARGETS[5].1);
}

#[test]
fn redact() {
    replay(TARGETS[6].0, TARGETS[6].1);
}

#[test]
fn sse() {
    replay(TARGETS[7].0, TARGETS[7].1);
}

#[test]
fn every_target_has_a_corpus() {
    for (t, _) in TARGETS {
        assert!(!inputs(t).is_empty(), "{t}");
    }
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let n = std::fs::read_dir(targets).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, TARGETS.len(), "a fuzz target without a replay here (or the reverse)");
}

/// The fuzz target checks one kind of admin event per input; here every saved input's
/// text goes through every kind, so the replay covers them all whatever the first bytes.
#[test]
fn admin_corpus_text_in_every_admin_event() {
    for f in inputs(TARGETS[3].0) {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let text = String::from_utf8_lossy(&data[..data.len().min(512)]).into_owned();
        inferd_proptests::check_admin_events(&text);
    }
}
