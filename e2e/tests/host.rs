//! Files and start-up (spec §6): socket modes, the single-instance lock, configuration
//! errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use inferd_e2e::*;

both_shells!(
    socket_modes_from_the_first_moment,
    socket_modes_under_a_restrictive_umask,
    second_daemon_is_refused_by_the_lock,
    symlink_lock_is_refused,
    no_backend_configured_explains_the_fix,
    bad_config_key_is_named,
    serve_help_mentions_backend,
);

/// Polls the runtime directory as fast as it can while the daemon starts, and checks
/// the mode of every observation of each socket (never wider than the spec's), and the
/// final modes: infer.sock 0660, admin.sock 0600, the directory 0700.
fn check_modes_while_starting(shell: Shell, umask: u32) {
    let mut d = shell.daemon().umask(umask).args(["--mock-load-ms", "300"]).spawn();
    let expected: BTreeMap<&str, u32> =
        [("infer.sock", 0o660), ("admin.sock", 0o600)].into_iter().collect();
    let mut first_seen: BTreeMap<&str, u32> = BTreeMap::new();
    let mut observations = 0u64;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while first_seen.len() < expected.len() {
        if let Some((mode, _)) = mode_of(&d.run_dir) {
            assert_eq!(mode & !0o700, 0, "runtime dir observed with mode {mode:o}");
        }
        for (name, want) in &expected {
            if let Some((mode, is_socket)) = mode_of(&d.run_dir.join(name)) {
                observations += 1;
                assert!(is_socket, "{name} is not a socket");
                assert_eq!(
                    mode & !want,
                    0,
                    "{name} observed with mode {mode:o}, wider than {want:o} (umask {umask:03o})"
                );
                first_seen.entry(name).or_insert(mode);
            }
        }
        if d.exit_status().is_some() {
            panic!("the daemon exited while starting: {}", d.stderr());
        }
        assert!(Instant::now() < deadline, "sockets not created: seen {first_seen:?}");
        thread::yield_now();
    }
    let seen: Vec<String> = first_seen.iter().map(|(n, m)| format!("{n} {m:o}")).collect();
    eprintln!("{shell}: umask {umask:03o}: first seen {seen:?} ({observations} observations)");
    d.wait_ready();
    for (name, want) in &expected {
        let (mode, _) = mode_of(&d.run_dir.join(name)).unwrap();
        assert_eq!(mode, *want, "{name}: mode {mode:o}, want {want:o} (umask {umask:03o})");
    }
    let (dir_mode, _) = mode_of(&d.run_dir).unwrap();
    assert_eq!(dir_mode, 0o700, "runtime dir mode {dir_mode:o}");
}

fn socket_modes_from_the_first_moment(shell: Shell) {
    // The most permissive umask: whatever the daemon relies on, 0 does not narrow it.
    check_modes_while_starting(shell, 0o000);
}

fn socket_modes_under_a_restrictive_umask(shell: Shell) {
    // The spec's modes hold whatever the umask: infer.sock stays group-usable.
    check_modes_while_starting(shell, 0o077);
}

/// A second daemon on the same runtime directory exits non-zero naming the lock, and
/// leaves the first one (and its sockets) alone.
fn second_daemon_is_refused_by_the_lock(shell: Shell) {
    let first = shell.daemon().start();
    let tmp = TempDir::new("second");
    let out = run(
        shell
            .command(&tmp)
            .args(["serve", "--backend", "mock", "--runtime-dir"])
            .arg(&first.run_dir)
            .arg("--log-dir")
            .arg(tmp.join("logs")),
        EXIT_TIMEOUT,
    );
    assert_ne!(out.code(), 0, "the second daemon started: {out:?}");
    let lock = first.lock_path();
    assert!(
        out.stderr.contains(&*lock.to_string_lossy()),
        "stderr should name the lock {}: {}",
        lock.display(),
        out.stderr
    );
    // The first keeps serving on the same socket files.
    assert_eq!(first.ask(&req("still", "first one")).done().0, "first one");
    let mut admin = first.admin();
    assert_eq!(admin.next_event().unwrap()["status"], "capabilities");
    assert!(lock.is_file(), "the lock file stays");
}

/// `--lock` pointing at a symlink (to an existing file, or dangling) is refused.
fn symlink_lock_is_refused(shell: Shell) {
    let tmp = TempDir::new("symlock");
    let target = tmp.join("real-lock");
    std::fs::write(&target, b"").unwrap();
    let dangling_target = tmp.join("not-there");
    for (link, to) in [(tmp.join("lock-link"), &target), (tmp.join("dangling"), &dangling_target)] {
        std::os::unix::fs::symlink(to, &link).unwrap();
        let out = run(
            shell
                .command(&tmp)
                .args(["serve", "--backend", "mock", "--runtime-dir"])
                .arg(tmp.join("run"))
                .arg("--log-dir")
                .arg(tmp.join("logs"))
                .arg("--lock")
                .arg(&link),
            EXIT_TIMEOUT,
        );
        assert_ne!(out.code(), 0, "a symlinked lock was accepted: {out:?}");
        assert!(out.stderr.contains("symlink"), "the message should say why: {out:?}");
        assert!(!dangling_target.exists(), "the daemon created the symlink's target");
        assert!(!tmp.join("run/infer.sock").exists());
    }
}

fn serve_without(shell: Shell, tmp: &TempDir, extra: &[PathBuf]) -> Output {
    let mut cmd = shell.command(tmp);
    cmd.args(["serve", "--runtime-dir"])
        .arg(tmp.join("run"))
        .arg("--log-dir")
        .arg(tmp.join("logs"))
        .args(extra);
    run(&mut cmd, EXIT_TIMEOUT)
}

/// No `--backend` and no config file in HOME: a non-zero exit and a message that says
/// how to fix it.
fn no_backend_configured_explains_the_fix(shell: Shell) {
    let tmp = TempDir::new("nobackend");
    let out = serve_without(shell, &tmp, &[]);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("no backend"), "{out:?}");
    assert!(out.stderr.contains("--backend"), "the message should show the flag: {out:?}");
}

/// A config file with an unknown key: a non-zero exit naming the key.
fn bad_config_key_is_named(shell: Shell) {
    let tmp = TempDir::new("badkey");
    let config = tmp.join("config.json");
    std::fs::write(&config, r#"{"backend": "mock", "queue_depht": 3}"#).unwrap();
    let out = serve_without(shell, &tmp, &["--config".into(), config]);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("queue_depht"), "the key should be named: {out:?}");
    // The same from the default path, ~/.inferd/config.json.
    let home_cfg = tmp.home().join(".inferd");
    std::fs::create_dir_all(&home_cfg).unwrap();
    std::fs::write(home_cfg.join("config.json"), r#"{"max_frame_byte": 4096}"#).unwrap();
    let out = serve_without(shell, &tmp, &["--backend".into(), "mock".into()]);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("max_frame_byte"), "the key should be named: {out:?}");
}

fn serve_help_mentions_backend(shell: Shell) {
    let tmp = TempDir::new("help");
    let out = run(shell.command(&tmp).args(["serve", "--help"]), Duration::from_secs(20));
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("--backend"), "{out:?}");
}
