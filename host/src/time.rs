//! Clocks for the shells: the monotonic clock the core's [`Time`] is read from, and the
//! wall clock for activity timestamps.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use inferd_core::Time;

/// Milliseconds since the Unix epoch on the wall clock, for activity records; 0 if the
/// clock is set before 1970.
pub fn unix_millis_now() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Maps the OS monotonic clock onto the core's [`Time`], counting from the moment the
/// clock was made. One per daemon, so every `now` handed to the core shares the origin.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock::new()
    }
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> MonotonicClock {
        MonotonicClock { origin: Instant::now() }
    }

    /// A clock with the given origin.
    pub fn with_origin(origin: Instant) -> MonotonicClock {
        MonotonicClock { origin }
    }

    /// The instant that maps to [`Time::ZERO`].
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// The current time.
    pub fn now(&self) -> Time {
        self.time_of(Instant::now())
    }

    /// The core time of an instant (the origin for instants before it).
    pub fn time_of(&self, instant: Instant) -> Time {
        let nanos = instant.saturating_duration_since(self.origin).as_nanos();
        Time::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The instant a core time stands for, for the shell's timers (`poll_timeout`).
    /// A time too far out to represent maps to roughly a century from the origin, which
    /// no timer reaches.
    pub fn instant_of(&self, time: Time) -> Instant {
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        let offset = Duration::from_nanos(time.as_nanos());
        self.origin
            .checked_add(offset)
            .or_else(|| self.origin.checked_add(far))
            .unwrap_or(self.origin)
    }

    /// How long from now until `time`; zero if it has passed.
    pub fn until(&self, time: Time) -> Duration {
        self.instant_of(time).saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_is_after_2020() {
        // 2020-01-01T00:00:00Z.
        assert!(unix_millis_now() > 1_577_836_800_000);
    }

    #[test]
    fn monotonic_clock_maps_both_ways() {
        let clock = MonotonicClock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
        let origin = clock.origin();
        assert_eq!(clock.time_of(origin), Time::ZERO);
        let later = origin + Duration::from_millis(1500);
        assert_eq!(clock.time_of(later), Time::from_millis(1500));
        assert_eq!(clock.instant_of(Time::from_millis(1500)), later);
        // Before the origin clamps to zero.
        if let Some(before) = origin.checked_sub(Duration::from_secs(1)) {
            assert_eq!(clock.time_of(before), Time::ZERO);
        }
        assert_eq!(clock.until(Time::ZERO), Duration::ZERO);
        assert!(clock.until(clock.now() + Duration::from_secs(60)) > Duration::from_secs(59));
        // Far-future deadlines do not panic.
        assert!(clock.instant_of(Time::from_nanos(u64::MAX)) > origin);
        let copy = MonotonicClock::with_origin(origin);
        assert_eq!(copy.time_of(later), clock.time_of(later));
    }
}
