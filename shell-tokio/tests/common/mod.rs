//! Helpers shared by the embedding tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use inferd_core::DaemonConfig;
use inferd_core::engine::Engine;
use inferd_engine_mock::{MockConfig, MockEngine};
use inferd_tokio::EmbedConfig;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A fresh runtime directory for one test, removed when the guard drops.
pub fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("inferd-tokio-{name}-")).tempdir().unwrap()
}

pub async fn wait_for(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

/// Sends one request and returns the frames' types and the concatenated token text.
pub async fn generate(socket: &Path, prompt: &str) -> (Vec<String>, String) {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let req = serde_json::json!({"id": "t", "messages": [{"role": "user", "content": prompt}]});
    stream.write_all(format!("{req}\n").as_bytes()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let (mut types, mut text) = (Vec::new(), String::new());
    while let Some(line) = lines.next_line().await.unwrap() {
        let frame: serde_json::Value = serde_json::from_str(&line).unwrap();
        let kind = frame["type"].as_str().unwrap().to_owned();
        if kind == "token" {
            text.push_str(frame["content"].as_str().unwrap());
        }
        let done = kind != "token";
        types.push(kind);
        if done {
            break;
        }
    }
    (types, text)
}

pub fn mock() -> Vec<Arc<dyn Engine>> {
    vec![Arc::new(MockEngine::new(MockConfig::default()))]
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

pub async fn start_use_stop(dir: &Path) {
    let daemon = EmbedConfig::new(dir, DaemonConfig::default(), mock())
        .log_dir(dir.join("logs"))
        .start()
        .unwrap();
    wait_for(daemon.infer_socket()).await;
    let (types, text) = generate(daemon.infer_socket(), "hello embedded world").await;
    assert_eq!(types.last().map(String::as_str), Some("done"));
    assert_eq!(text, "hello embedded world");
    assert_eq!(daemon.stats().served, 1);
    let paths = daemon.paths().clone();
    daemon.shutdown();
    daemon.wait().await.expect("an orderly drain");
    assert!(!paths.infer.exists() && !paths.admin.exists(), "sockets left behind");
}
