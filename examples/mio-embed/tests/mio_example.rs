//! Runs the `mio_embed` binary (`src/main.rs`): one request over its socket must get the
//! echo and a `done` frame, and `--exit-after-requests 1` must make it drain and exit 0.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the example if the test fails half-way.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn mio_example_serves_one_request_and_exits() {
    let dir = std::env::temp_dir().join(format!("inferd-mio-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("infer.sock");
    let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
    let log = || std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();

    let child = Command::new(env!("CARGO_BIN_EXE_mio_embed"))
        .arg("--socket")
        .arg(&socket)
        .args(["--exit-after-requests", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("cannot run the mio_embed binary");
    let mut child = KillOnDrop(child);

    // The binary is built before the test runs; this only bounds its start-up.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !Path::new(&socket).exists() {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the example exited early with {status}:\n{}", log());
        }
        assert!(Instant::now() < deadline, "the socket never appeared:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }

    // The file exists from bind(); until listen() a connect is refused.
    let mut stream = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(Instant::now() < deadline, "the socket never listened:\n{}", log());
                std::thread::yield_now();
            }
            Err(e) => panic!("cannot connect to the example: {e}\n{}", log()),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
        .write_all(
            b"{\"id\":\"m1\",\"messages\":[{\"role\":\"user\",\"content\":\"hello mio loop\"}]}\n",
        )
        .unwrap();
    let mut frames = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.unwrap();
        let frame: serde_json::Value = serde_json::from_str(&line).unwrap();
        let done = frame["type"] != "token";
        frames.push(frame);
        if done {
            break;
        }
    }
    let last = frames.last().expect("no frames");
    assert_eq!(last["type"], "done", "{frames:?}");
    assert_eq!(last["id"], "m1");
    assert_eq!(last["content"], "hello mio loop");
    let tokens: String = frames
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["content"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, "hello mio loop");

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the example did not exit:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}:\n{}", log());
    assert!(!socket.exists(), "the socket file was left behind");
    let _ = std::fs::remove_dir_all(&dir);
}
