//! Hostile inputs over real sockets (issues 10 and 15): malformed UTF-8, over-cap lines
//! without an LF, whitespace trickles, and TCP peers that never authenticate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use inferd_e2e::*;

both_shells!(
    invalid_utf8_in_an_unknown_field_is_undecodable,
    over_cap_without_lf_is_answered_at_once,
    whitespace_trickle_is_subject_to_the_read_timeout,
    blank_lines_before_the_key_line_are_skipped,
    line_feeds_before_authentication_do_not_grow_the_daemon,
    idle_tcp_strangers_time_out_and_never_lock_out_unix_clients,
);

const KEY: &str = "e2e-secret-key";

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe listener");
    l.local_addr().expect("local_addr").port()
}

/// A daemon with a TCP listener that requires [`KEY`]; returns it and the address.
fn tcp_daemon(shell: Shell, extra: &[&str]) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let d = shell.daemon().args(["--tcp", addr.as_str(), "--api-key", KEY]).args(extra).start();
    (d, addr)
}

fn tcp(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(READ_TIMEOUT)).expect("set_read_timeout");
    s
}

/// Reads one line, or `None` when the daemon closed the connection.
fn read_line(r: &mut BufReader<TcpStream>) -> Option<Value> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(serde_json::from_str(&line).expect("a JSON frame")),
    }
}

/// The daemon's resident memory in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS")
}

/// Issue 10#1: invalid UTF-8 anywhere in the line, even in a field the daemon ignores,
/// makes it undecodable: `invalid_request`, then close.
fn invalid_utf8_in_an_unknown_field_is_undecodable(shell: Shell) {
    let d = shell.daemon().start();
    let lines: [&[u8]; 2] = [
        b"{\"id\":\"u\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"x\":\"\xff\"}\n",
        b"{\"id\":\"k\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"\xc3\":1}\n",
    ];
    for line in lines {
        let mut c = d.connect();
        c.send_raw(line);
        let r = c.read_reply();
        assert_eq!(r.error(), ErrorCode::InvalidRequest, "{}", String::from_utf8_lossy(line));
        c.expect_closed();
    }
    assert_eq!(d.ask(&req("ok", "still serving")).done().0, "still serving");
}

/// Issue 10#2: `max_frame_bytes + 1` bytes without an LF are answered with
/// `frame_too_large` and a close at once, without waiting for the LF.
fn over_cap_without_lf_is_answered_at_once(shell: Shell) {
    let d = shell.daemon().config("max_frame_bytes", json!(4096)).start();
    let mut c = d.connect();
    c.send_raw(&[b'x'; 4097]);
    let r = c.read_reply();
    assert_eq!(r.error(), ErrorCode::FrameTooLarge);
    c.expect_closed();
    // Exactly the cap, then a CR the cap does not count: still waiting for the LF.
    let mut ok = d.connect();
    let line = req("fits", &"y".repeat(100)).to_string();
    let mut bytes = line.into_bytes();
    bytes.resize(4096, b' ');
    bytes.push(b'\r');
    ok.send_raw(&bytes);
    ok.send_raw(b"\n");
    assert_eq!(ok.read_reply().done().0, "y".repeat(100));
}

/// Issue 15#5: a partial line of spaces is an unfinished line like any other.
fn whitespace_trickle_is_subject_to_the_read_timeout(shell: Shell) {
    let d = shell.daemon().args(["--read-timeout-secs", "1"]).start();
    let mut c = d.connect();
    c.send_raw(b"   ");
    c.expect_closed();
}

/// Issue 15#2: blank lines before the key line, all in one write, are skipped.
fn blank_lines_before_the_key_line_are_skipped(shell: Shell) {
    let (_d, addr) = tcp_daemon(shell, &[]);
    let mut s = tcp(&addr);
    let auth = json!({"type": "auth", "key": KEY});
    let msg = format!("\n \r\n{auth}\n{}\n", req("after-blanks", "hello tcp"));
    s.write_all(msg.as_bytes()).expect("write");
    let mut r = BufReader::new(s);
    let mut text = String::new();
    loop {
        let f = read_line(&mut r).expect("a frame before the close");
        match f["type"].as_str() {
            Some("token") => text.push_str(f["content"].as_str().unwrap_or_default()),
            Some("done") => break,
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert_eq!(text, "hello tcp");
}

/// Issue 15#2: before authentication the daemon holds the auth line and one read, not
/// everything a stranger sends.
fn line_feeds_before_authentication_do_not_grow_the_daemon(shell: Shell) {
    // No auth deadline here: a slow machine may take a while to push 48 MiB.
    let (d, addr) = tcp_daemon(shell, &["--auth-timeout-secs", "0"]);
    let before = rss_kib(d.pid());
    let mut s = tcp(&addr);
    let chunk = vec![b'\n'; 1 << 20];
    for _ in 0..48 {
        s.write_all(&chunk).expect("the daemon keeps reading line feeds");
    }
    // The daemon has read everything once a request behind the key line is answered.
    let auth = json!({"type": "auth", "key": KEY});
    s.write_all(format!("{auth}\n{}\n", req("r", "after the flood")).as_bytes()).expect("write");
    let mut r = BufReader::new(s);
    let mut frames = 0;
    while let Some(f) = read_line(&mut r) {
        frames += 1;
        if f["type"] == "done" {
            break;
        }
    }
    assert!(frames > 0, "the request after the flood was answered");
    let grown = rss_kib(d.pid()).saturating_sub(before);
    assert!(grown < 16 * 1024, "48 MiB of line feeds grew the daemon by {grown} KiB");
}

/// Issue 15#4: unauthenticated TCP peers have a deadline and at most a quarter of
/// `max_connections`; Unix-socket clients are still served meanwhile.
fn idle_tcp_strangers_time_out_and_never_lock_out_unix_clients(shell: Shell) {
    let (d, addr) = tcp_daemon(shell, &["--max-connections", "8", "--auth-timeout-secs", "2"]);
    let mut idle: Vec<TcpStream> = (0..8).map(|_| tcp(&addr)).collect();
    // Every Unix client still gets in and is served.
    let mut unix: Vec<Client> = (0..5).map(|_| d.connect()).collect();
    for (i, c) in unix.iter_mut().enumerate() {
        c.send(&req(&format!("u{i}"), "unix first"));
        assert_eq!(c.read_reply().done().0, "unix first");
    }
    // The strangers are closed: those past the budget at once, the rest at the deadline.
    for s in &mut idle {
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("a stranger got {n} bytes before authenticating"),
        }
    }
}
