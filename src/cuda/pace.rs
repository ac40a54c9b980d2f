//! What each route of a device (copy direction, copy engines or the SM kernel, local or to
//! another device's memory) has been moving per microsecond, learned from finished transfers.
//! A waiter uses it to sleep until shortly before a transfer should end and then watch the
//! transfer's event itself: waking a sleeping thread (on a VM, a halted vCPU) costs tens of
//! microseconds, which is a large share of a sub-millisecond device-to-device copy.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Direction;

/// Transfers smaller than this say more about fixed costs than about bandwidth.
const MIN_BYTES: u64 = 4 << 20;

/// What a rate is kept for: the copy direction, whether the SM kernel moves the bytes (else
/// the copy engines), and whether another device's memory is one side (a peer link runs at
/// its own speed, and must not teach a local copy's waiter to wake late).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub direction: Direction,
    pub kernel: bool,
    pub peer: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Pace {
    /// Bytes per microsecond by direction, peer, then copy engines (0) or kernel (1); 0 =
    /// nothing learned yet.
    bytes_per_us: [[[AtomicU64; 2]; 2]; 3],
}

impl Pace {
    fn slot(&self, r: Route) -> &AtomicU64 {
        &self.bytes_per_us[r.direction as usize][usize::from(r.peer)][usize::from(r.kernel)]
    }

    /// How long `bytes` should take on route `r`, once something was learned.
    pub fn expected(&self, r: Route, bytes: u64) -> Option<Duration> {
        let rate = self.slot(r).load(Ordering::Relaxed);
        (rate > 0).then(|| Duration::from_micros(bytes / rate))
    }

    /// How long after its submit a transfer of `bytes` on route `r` should end: `None` when
    /// nothing was learned yet, or when it is `gated` on a caller's stream (its start is not
    /// known).
    pub fn due(&self, r: Route, bytes: u64, gated: bool) -> Option<Duration> {
        if gated { None } else { self.expected(r, bytes) }
    }

    /// A transfer of `bytes` on route `r` took `elapsed` from submit to completion. One that
    /// `waited` for other work first (a caller's stream, transfers queued before it) teaches
    /// nothing, or the waiters after it would wake late.
    pub fn learn(&self, r: Route, bytes: u64, elapsed: Duration, waited: bool) {
        if waited || bytes < MIN_BYTES {
            return;
        }
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let sample = (bytes / us).max(1);
        let slot = self.slot(r);
        let old = slot.load(Ordering::Relaxed);
        // The best recent rate, fading by an eighth per transfer: one slow transfer must not
        // push every later wake-up too late. A faster one counts at most double, so that one
        // wrong sample cannot make waiters give up watching long before the end (a rate ten
        // times too fast did so for ~10 transfers in a row; session 20).
        let rate = if old == 0 {
            sample
        } else if sample > old {
            sample.min(old.saturating_mul(2))
        } else {
            sample.max(old - old / 8)
        };
        slot.store(rate, Ordering::Relaxed);
    }
}

/// When the work queued on each direction's stream should end, as predicted at each submit:
/// a transfer queued behind others is due after them, not one transfer's time after its own
/// submit (else the waiter of the second of two back-to-back 1 GiB copies watched from ~300
/// µs, gave up after its 500 µs, and was reported by the progress engine after the end).
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    ends: [Mutex<Option<Instant>>; 3],
}

impl Backlog {
    /// A transfer expected to take `expected` is queued at `now` on `direction`'s stream: how
    /// long it should wait behind the work queued before it (zero where that should be done
    /// by then). An unknown duration (nothing learned, or a start gated on a caller's stream)
    /// ends the prediction: the transfers after it are taken to start at once, which errs
    /// early, as the pace does.
    pub fn queue(
        &self,
        direction: Direction,
        now: Instant,
        expected: Option<Duration>,
    ) -> Duration {
        let mut end = self.ends[direction as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let behind = end.map_or(Duration::ZERO, |e| e.saturating_duration_since(now));
        *end = expected.map(|e| now + behind + e);
        behind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(direction: Direction, kernel: bool) -> Route {
        Route {
            direction,
            kernel,
            peer: false,
        }
    }

    #[test]
    fn learns_from_large_transfers_only() {
        let p = Pace::default();
        let d = Direction::DeviceToDevice;
        assert_eq!(p.expected(route(d, true), 1 << 30), None);
        p.learn(route(d, true), 4096, Duration::from_micros(20), false);
        assert_eq!(p.expected(route(d, true), 1 << 30), None);
        p.learn(route(d, true), 1 << 30, Duration::from_micros(500), false);
        let e = p.expected(route(d, true), 1 << 30).unwrap();
        assert!((499..=501).contains(&e.as_micros()), "{e:?}");
        // One gated on a caller's stream is not due at any known time.
        assert_eq!(p.due(route(d, true), 1 << 30, false), Some(e));
        assert_eq!(p.due(route(d, true), 1 << 30, true), None);
        // A transfer that waited for a caller's stream says nothing of the route.
        p.learn(route(d, true), 1 << 30, Duration::from_micros(5000), true);
        let e = p.expected(route(d, true), 1 << 30).unwrap();
        assert!((499..=501).contains(&e.as_micros()), "{e:?}");
        // Other directions, the other mechanism and peer links learn apart.
        assert_eq!(
            p.expected(route(Direction::HostToDevice, true), 1 << 30),
            None
        );
        assert_eq!(p.expected(route(d, false), 1 << 30), None);
        let peer = Route {
            peer: true,
            ..route(d, true)
        };
        assert_eq!(p.expected(peer, 1 << 30), None);
        p.learn(peer, 1 << 30, Duration::from_micros(20_000), false);
        let e = p.expected(route(d, true), 1 << 30).unwrap();
        assert!((499..=501).contains(&e.as_micros()), "{e:?}");
    }

    #[test]
    fn a_transfer_queued_behind_others_is_due_after_them() {
        let b = Backlog::default();
        let d = Direction::DeviceToDevice;
        let t0 = Instant::now();
        let us = Duration::from_micros;
        // An idle stream: at once; the next two behind it and each other.
        assert_eq!(b.queue(d, t0, Some(us(500))), Duration::ZERO);
        assert_eq!(b.queue(d, t0 + us(10), Some(us(500))), us(490));
        assert_eq!(b.queue(d, t0 + us(20), Some(us(500))), us(980));
        // Another direction's stream is its own.
        assert_eq!(
            b.queue(Direction::HostToDevice, t0, Some(us(500))),
            Duration::ZERO
        );
        // Once the predicted end passed, at once again.
        assert_eq!(b.queue(d, t0 + us(2000), Some(us(500))), Duration::ZERO);
        // An unknown duration ends the prediction: the next is taken to start at once.
        assert_eq!(b.queue(d, t0 + us(2100), None), us(400));
        assert_eq!(b.queue(d, t0 + us(2110), Some(us(500))), Duration::ZERO);
    }

    #[test]
    fn one_slow_transfer_moves_the_rate_by_an_eighth() {
        let p = Pace::default();
        let d = Direction::HostToDevice;
        p.learn(route(d, false), 1 << 30, Duration::from_micros(800), false);
        p.learn(
            route(d, false),
            1 << 30,
            Duration::from_micros(80_000),
            false,
        );
        let e = p.expected(route(d, false), 1 << 30).unwrap().as_micros();
        assert!((900..=920).contains(&e), "{e}");
        // A faster one (within double) is taken at once.
        p.learn(route(d, false), 1 << 30, Duration::from_micros(500), false);
        let e = p.expected(route(d, false), 1 << 30).unwrap().as_micros();
        assert!((499..=501).contains(&e), "{e}");
    }

    #[test]
    fn one_fast_transfer_at_most_doubles_the_rate() {
        let p = Pace::default();
        let d = Direction::DeviceToDevice;
        p.learn(route(d, true), 1 << 30, Duration::from_micros(560), false);
        // A sample ten times too fast (a look that found a transfer pending early on).
        p.learn(route(d, true), 1 << 30, Duration::from_micros(56), false);
        let e = p.expected(route(d, true), 1 << 30).unwrap().as_micros();
        assert!((279..=281).contains(&e), "{e}");
        // Then it fades back an eighth per transfer, as after any faster one.
        p.learn(route(d, true), 1 << 30, Duration::from_micros(560), false);
        let e = p.expected(route(d, true), 1 << 30).unwrap().as_micros();
        assert!((319..=321).contains(&e), "{e}");
    }
}
