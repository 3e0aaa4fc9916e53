//! Activity records: one NDJSON object per event, redacted before it leaves the core.
//!
//! Records carry `t` (RFC 3339, UTC), `level`, `component`, `msg` and flat fields. The
//! core has no wall clock: [`WallClock`] maps the shell's monotonic [`Time`] onto the
//! wall-clock reading the shell gave once at start. Every string value goes through
//! [`redact`](crate::redact::redact()); prompts and outputs are never recorded.

use crate::redact::redact;
use crate::time::Time;
use crate::wire::{write_json_str, write_u64};

/// Maps monotonic time to wall-clock time from one reading taken at start.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    mono: Time,
    unix_ms: u64,
}

impl WallClock {
    /// `unix_ms` was the wall clock (ms since the Unix epoch) when the monotonic clock read `mono`.
    pub fn new(mono: Time, unix_ms: u64) -> Self {
        WallClock { mono, unix_ms }
    }

    /// Milliseconds since the Unix epoch at `now`.
    pub fn unix_ms(&self, now: Time) -> u64 {
        self.unix_ms + now.millis_since(self.mono)
    }
}

/// Severity of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Normal operation.
    Info,
    /// Something went wrong for one request or peer.
    Warn,
}

/// Builds one activity line.
#[derive(Debug)]
pub struct Record {
    line: Vec<u8>,
}

impl Record {
    /// Starts a record at wall time `unix_ms`.
    pub fn new(unix_ms: u64, level: Level, component: &str, msg: &str) -> Self {
        let mut line = Vec::with_capacity(256);
        line.extend_from_slice(b"{\"t\":\"");
        write_rfc3339(&mut line, unix_ms);
        line.extend_from_slice(b"\",\"level\":\"");
        line.extend_from_slice(match level {
            Level::Info => b"info",
            Level::Warn => b"warn",
        });
        line.extend_from_slice(b"\",\"component\":");
        write_json_str(&mut line, component);
        line.extend_from_slice(b",\"msg\":");
        write_json_str(&mut line, msg);
        Record { line }
    }

    /// Adds a string field; its value is redacted.
    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        write_json_str(&mut self.line, &redact(value));
        self
    }

    /// Adds a numeric field.
    pub fn num(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        write_u64(&mut self.line, value);
        self
    }

    /// Adds a string field when present; absent fields are left out, never `null`.
    pub fn opt_str(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.str(key, v),
            None => self,
        }
    }

    /// Adds a numeric field when present; absent fields are left out, never `null`.
    pub fn opt_num(self, key: &str, value: Option<u64>) -> Self {
        match value {
            Some(v) => self.num(key, v),
            None => self,
        }
    }

    fn key(&mut self, key: &str) {
        self.line.push(b',');
        write_json_str(&mut self.line, key);
        self.line.push(b':');
    }

    /// The finished line, with its LF.
    pub fn finish(mut self) -> String {
        self.line.extend_from_slice(b"}\n");
        // Every piece written is valid UTF-8 (JSON-escaped str or ASCII).
        String::from_utf8(self.line)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// Writes `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn write_rfc3339(out: &mut Vec<u8>, unix_ms: u64) {
    let secs = unix_ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    let mut field = |v: u64, width: usize, sep: u8| {
        let mut digits = [b'0'; 4];
        let mut v = v;
        for slot in digits[..width].iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&digits[..width]);
        if sep != 0 {
            out.push(sep);
        }
    };
    field(y.clamp(0, 9999) as u64, 4, b'-');
    field(m.into(), 2, b'-');
    field(d.into(), 2, b'T');
    field(sod / 3600, 2, b':');
    field((sod / 60) % 60, 2, b':');
    field(sod % 60, 2, b'.');
    field(unix_ms % 1000, 3, b'Z');
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let mut out = Vec::new();
        write_rfc3339(&mut out, 0);
        assert_eq!(out, b"1970-01-01T00:00:00.000Z");
        out.clear();
        // 2026-11-27T12:04:53.250Z
        write_rfc3339(&mut out, 1_795_781_093_250);
        assert_eq!(String::from_utf8(out).unwrap(), "2026-11-27T12:04:53.250Z");
        let mut out = Vec::new();
        write_rfc3339(&mut out, 951_782_400_000); // leap day 2000
        assert_eq!(String::from_utf8(out).unwrap(), "2000-02-29T00:00:00.000Z");
    }

    /// Every day from 1970 to past 2400 against a calendar counted one day at a time:
    /// century years (1900-style non-leap 2100, 2200, 2300, leap 2400) and the last day
    /// of a 400-year era are where the closed-form arithmetic can go wrong unnoticed.
    #[test]
    fn civil_dates_match_a_day_by_day_calendar() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        for day in 0..(431 * 366) {
            assert_eq!(civil_from_days(day), (y, m, d), "day {day}");
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        assert!(y > 2400);
        let mut out = Vec::new();
        write_rfc3339(&mut out, 13_574_649_599_999); // the last millisecond of 2400-02-29
        assert_eq!(String::from_utf8(out).unwrap(), "2400-02-29T23:59:59.999Z");
    }

    #[test]
    fn records_are_json_and_redacted() {
        let line = Record::new(0, Level::Info, "daemon", "request_done")
            .str("req_id", "password=hunter2")
            .num("prompt_tokens", 3)
            .opt_num("ttft_ms", None)
            .finish();
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["msg"], "request_done");
        assert_eq!(v["req_id"], "password=[REDACTED]");
        assert_eq!(v["prompt_tokens"], 3);
        assert!(v.get("ttft_ms").is_none());
        assert!(!line.contains("hunter2"));
    }

    #[test]
    fn wall_clock_follows_monotonic_time() {
        let w = WallClock::new(Time::from_secs(10), 1_000_000);
        assert_eq!(w.unix_ms(Time::from_secs(12)), 1_002_000);
        assert_eq!(w.unix_ms(Time::from_secs(5)), 1_000_000);
    }
}
