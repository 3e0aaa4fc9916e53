//! The admin socket (spec §5) and the command-line client (`inferd status`/`generate`).

use inferd_e2e::*;

both_shells!(
    admin_capabilities_then_ready,
    admin_subscriber_sees_loading_then_ready,
    cli_status_and_generate,
    cli_generate_failed_request_exits_1,
);

fn check_capabilities(v: &Value) {
    assert_eq!(v["status"], "capabilities", "{v}");
    assert_eq!(v["backend"], "mock", "{v}");
    for key in ["v2", "vision", "audio", "tools", "thinking", "embed"] {
        assert!(v[key].is_boolean(), "capabilities.{key} should be a bool: {v}");
    }
    assert!(v["accelerator"].is_string(), "{v}");
    assert!(v["gpu_layers"].is_u64(), "{v}");
}

/// After ready: every capabilities frame published so far, then the snapshot `ready`.
fn admin_capabilities_then_ready(shell: Shell) {
    let d = shell.daemon().start();
    let mut admin = d.admin();
    let first = admin.next_event().expect("an event");
    check_capabilities(&first);
    let mut next = admin.next_event().expect("an event");
    while next["status"] == "capabilities" {
        check_capabilities(&next);
        next = admin.next_event().expect("an event");
    }
    assert_eq!(next["status"], "ready", "snapshot after the capabilities: {next}");
    // Later events follow: a request makes a `stats` event (default interval 1 s).
    assert_eq!(d.ask(&req("r", "hello")).done().0, "hello");
    let s = admin
        .wait_stats("served 1", std::time::Duration::from_secs(20), |s| stat(s, "served") == 1);
    assert!(s["breakers"]["mock"].is_string(), "{s}");
}

/// A subscriber connected while the backend loads sees `loading_model` with phases,
/// then the capabilities, then `ready`; the inference socket appears only then.
fn admin_subscriber_sees_loading_then_ready(shell: Shell) {
    let mut d = shell.daemon().args(["--mock-load-ms", "500"]).spawn();
    let mut admin = d.wait_admin();
    let mut statuses = Vec::new();
    loop {
        let v = admin.next_event().expect("admin socket closed before ready");
        let status = v["status"].as_str().unwrap().to_string();
        match status.as_str() {
            "loading_model" => {
                assert!(v["phase"].is_string(), "loading_model without a phase: {v}");
                assert!(
                    !statuses.iter().any(|s| s == "capabilities"),
                    "loading after capabilities: {statuses:?}"
                );
            }
            "capabilities" => check_capabilities(&v),
            "ready" => {
                statuses.push(status);
                break;
            }
            "starting" | "stats" => {}
            other => panic!("unexpected status {other} while loading: {v}"),
        }
        statuses.push(status);
    }
    eprintln!("{shell}: admin statuses {statuses:?}");
    assert!(statuses.iter().any(|s| s == "loading_model"), "no loading_model: {statuses:?}");
    let caps = statuses.iter().position(|s| s == "capabilities").expect("no capabilities");
    assert!(caps < statuses.len() - 1, "capabilities must come before ready: {statuses:?}");
    d.wait_ready();
    assert_eq!(d.ask(&req("r", "loaded now")).done().0, "loaded now");
}

/// `inferd status --once` prints `ready`; `inferd generate` exits 0 on success, 3 when
/// no daemon is reachable and 2 on a usage error.
fn cli_status_and_generate(shell: Shell) {
    let d = shell.daemon().start();
    let cli = || {
        let mut c = std::process::Command::new(client_binary());
        c.env_remove("XDG_RUNTIME_DIR").env("HOME", d.tmp().home());
        c
    };
    let out = run(cli().args(["status", "--once", "--runtime-dir"]).arg(&d.run_dir), EXIT_TIMEOUT);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.lines().any(|l| l.trim() == "ready"), "{out:?}");
    assert!(out.stdout.contains("backend mock"), "{out:?}");

    let out = run(
        cli().args(["generate", "--runtime-dir"]).arg(&d.run_dir).arg("hello there"),
        EXIT_TIMEOUT,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "hello there\n", "{out:?}");

    let empty = d.tmp().join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(cli().args(["generate", "--runtime-dir"]).arg(&empty).arg("hi"), EXIT_TIMEOUT);
    assert_eq!(out.code(), 3, "no daemon: {out:?}");
    assert!(out.stderr.contains("not reachable"), "{out:?}");

    let out = run(
        cli().args(["generate", "--no-such-flag", "--runtime-dir"]).arg(&d.run_dir).arg("hi"),
        EXIT_TIMEOUT,
    );
    assert_eq!(out.code(), 2, "usage error: {out:?}");
}

/// `inferd generate` exits 1 when the request fails.
fn cli_generate_failed_request_exits_1(shell: Shell) {
    let d = shell.daemon().args(["--mock-fail", "before"]).start();
    let out = run(
        std::process::Command::new(client_binary())
            .env("HOME", d.tmp().home())
            .args(["generate", "--runtime-dir"])
            .arg(&d.run_dir)
            .arg("fails"),
        EXIT_TIMEOUT,
    );
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("backend_unavailable"), "{out:?}");
}
