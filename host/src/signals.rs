//! Signal numbers the shells need beside those their runtimes name.

/// SIGXFSZ, which a write past `RLIMIT_FSIZE` raises. Its default action kills the
/// process, leaving the sockets behind and clients without a terminal frame, so the
/// shells register a handler that does nothing: the write then fails with `EFBIG`, and
/// the activity log reports it and drops the record like any other write failure. For
/// runtimes whose signal API takes raw numbers (tokio's `SignalKind::from_raw`).
pub const SIGXFSZ: i32 = rustix::process::Signal::XFSZ.as_raw();
