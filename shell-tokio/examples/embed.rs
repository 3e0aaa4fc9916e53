//! Embedding inferd in a tokio program: start a daemon with your own engines, serve until
//! Ctrl-C, then drain and stop it.
//!
//! `cargo run -p inferd-tokio --example embed -- /tmp/embed-run` then
//! `inferd generate --runtime-dir /tmp/embed-run "hello"`.

use std::sync::Arc;

use inferd_core::DaemonConfig;
use inferd_core::engine::Engine;
use inferd_engine_mock::{MockConfig, MockEngine};
use inferd_tokio::EmbedConfig;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/tmp/inferd-embed".into());
    let engines: Vec<Arc<dyn Engine>> = vec![Arc::new(MockEngine::new(MockConfig::default()))];
    let daemon = EmbedConfig::new(dir, DaemonConfig::default(), engines).start()?;
    println!("inference socket: {}", daemon.infer_socket().display());
    tokio::signal::ctrl_c().await?;
    println!("served {} requests; draining", daemon.stats().served);
    daemon.shutdown();
    daemon.wait().await?; // Ok after an orderly drain
    println!("daemon drained and stopped");
    Ok(())
}
