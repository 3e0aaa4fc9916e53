//! The embedding API: a daemon started inside a test's tokio runtime, used over its
//! socket, stopped through its handle.

mod common;

use common::{mock, start_use_stop, temp_dir};
use inferd_core::DaemonConfig;
use inferd_tokio::{EmbedConfig, StartErrorKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_daemon_serves_and_stops_on_a_multi_thread_runtime() {
    let dir = temp_dir("mt");
    start_use_stop(dir.path()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn embedded_daemon_serves_on_a_current_thread_runtime() {
    let dir = temp_dir("ct");
    start_use_stop(dir.path()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_daemon_on_the_same_directory_is_refused() {
    let dir = temp_dir("lock");
    let first = EmbedConfig::new(dir.path(), DaemonConfig::default(), mock()).start().unwrap();
    let second = EmbedConfig::new(dir.path(), DaemonConfig::default(), mock()).start();
    let err = second.expect_err("the lock must refuse a second daemon");
    assert_eq!(err.kind, StartErrorKind::Failed, "{err}");
    first.shutdown();
    first.wait().await.expect("an orderly drain");
}

#[tokio::test(flavor = "current_thread")]
async fn mismatched_backend_names_are_a_usage_error() {
    let config = DaemonConfig { backends: vec!["a".into(), "b".into()], ..DaemonConfig::default() };
    let err = EmbedConfig::new(temp_dir("names").path(), config, mock()).start().unwrap_err();
    assert_eq!(err.kind, StartErrorKind::Usage);
}

/// A shutdown through the handle of an idle daemon still tells admin subscribers that it
/// drains before their connection closes (spec §4-§5).
#[tokio::test(flavor = "current_thread")]
async fn shutdown_through_the_handle_tells_admin_subscribers() {
    use tokio::io::AsyncBufReadExt;
    let dir = temp_dir("admin-drain");
    let daemon = EmbedConfig::new(dir.path(), DaemonConfig::default(), mock()).start().unwrap();
    common::wait_for(daemon.infer_socket()).await;
    let admin = tokio::net::UnixStream::connect(&daemon.paths().admin).await.unwrap();
    let mut lines = tokio::io::BufReader::new(admin).lines();
    let status = |line: &str| {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["status"].as_str().unwrap().to_owned()
    };
    loop {
        let line = lines.next_line().await.unwrap().expect("admin socket closed before ready");
        if status(&line) == "ready" {
            break;
        }
    }
    daemon.shutdown();
    let mut last = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        last = Some(status(&line));
    }
    assert_eq!(last.as_deref(), Some("draining"));
    daemon.wait().await.expect("an orderly drain");
}
