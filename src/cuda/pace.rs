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
    /// may have `waited` for other work first (a caller's stream, work queued before it on its
    /// stream: `Backlog::queue`) teaches nothing, or the waiters after it would wake late.
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

/// What is queued on each direction's stream: when it should end, as predicted at each
/// submit, so that a transfer queued behind others is due after them, not one transfer's time
/// after its own submit (else the waiter of the second of two back-to-back 1 GiB copies watched
/// from ~300 µs, gave up after its 500 µs, and was reported by the progress engine after the
/// end); and how far it was seen complete, so that a transfer that may have waited for work
/// before it teaches the pace nothing (each such taught a slower rate, and the progress engine,
/// finding them done when due, never taught it back: host <-> device ran at 0.22-0.37 of one
/// large copy from submit; session 21, device run 1).
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    lanes: [Mutex<Lane>; 3],
    /// The highest number (`Place::number`) seen complete on each stream.
    seen: [AtomicU64; 3],
}

#[derive(Debug, Default)]
struct Lane {
    /// When the work queued so far should end; `None`: unknown, or nothing queued.
    end: Option<Instant>,
    /// How many pieces of work were queued.
    queued: u64,
}

/// Where a piece of work stands on its stream (`Backlog::queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Place {
    /// Its number on the stream, for `Backlog::seen` once it completed.
    pub number: u64,
    /// How long it should wait behind the work queued before it (zero where that should be
    /// done by then).
    pub behind: Duration,
    /// Work queued before it was not yet seen complete: its age may hold a wait.
    pub may_wait: bool,
}

impl Backlog {
    /// Work expected to take `expected` was queued at `now` on `direction`'s stream. An
    /// unknown duration (nothing learned, a start gated on a caller's stream, a hop of a
    /// two-hop transfer) ends the prediction: the work after it is taken to start at once,
    /// which errs early, as the pace does, while `may_wait` holds until it is seen complete.
    /// Numbers follow the calls, which follow the stream's order when one thread queues; two
    /// threads racing on one stream may swap two numbers, which costs at most one slow sample.
    pub fn queue(&self, direction: Direction, now: Instant, expected: Option<Duration>) -> Place {
        let d = direction as usize;
        let mut lane = self.lanes[d].lock().unwrap_or_else(|p| p.into_inner());
        // Work seen complete ended when it did, however late it was predicted to.
        let may_wait = lane.queued > self.seen[d].load(Ordering::Acquire);
        let behind = match lane.end {
            Some(e) if may_wait => e.saturating_duration_since(now),
            _ => Duration::ZERO,
        };
        lane.queued += 1;
        lane.end = expected.map(|e| now + behind + e);
        Place {
            number: lane.queued,
            behind,
            may_wait,
        }
    }

    /// The work numbered `number` on `direction`'s stream completed, and with it all queued
    /// before it.
    pub fn seen(&self, direction: Direction, number: u64) {
        self.seen[direction as usize].fetch_max(number, Ordering::Release);
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
        let behind = |p: Place| p.behind;
        // An idle stream: at once; the next two behind it and each other.
        assert_eq!(behind(b.queue(d, t0, Some(us(500)))), Duration::ZERO);
        assert_eq!(behind(b.queue(d, t0 + us(10), Some(us(500)))), us(490));
        assert_eq!(behind(b.queue(d, t0 + us(20), Some(us(500)))), us(980));
        // Another direction's stream is its own.
        let h2d = b.queue(Direction::HostToDevice, t0, Some(us(500)));
        assert_eq!((h2d.behind, h2d.may_wait), (Duration::ZERO, false));
        // Once the predicted end passed, at once again.
        assert_eq!(
            behind(b.queue(d, t0 + us(2000), Some(us(500)))),
            Duration::ZERO
        );
        // An unknown duration ends the prediction: the next is taken to start at once.
        assert_eq!(behind(b.queue(d, t0 + us(2100), None)), us(400));
        assert_eq!(
            behind(b.queue(d, t0 + us(2110), Some(us(500)))),
            Duration::ZERO
        );
    }

    #[test]
    fn work_may_wait_until_the_work_before_it_is_seen_complete() {
        let b = Backlog::default();
        let d = Direction::HostToDevice;
        let t0 = Instant::now();
        let us = Duration::from_micros;
        // Alone on the stream: it waits for nothing.
        let first = b.queue(d, t0, Some(us(100)));
        assert_eq!((first.number, first.may_wait), (1, false));
        // Predicted done, but not seen so: the pace may have erred early.
        let second = b.queue(d, t0 + us(200), Some(us(100)));
        assert_eq!((second.behind, second.may_wait), (Duration::ZERO, true));
        // Once the second was seen complete (so the first too), the next waits for nothing,
        // though the second was predicted to end later.
        b.seen(d, second.number);
        let third = b.queue(d, t0 + us(250), Some(us(100)));
        assert_eq!((third.behind, third.may_wait), (Duration::ZERO, false));
        b.seen(d, third.number);
        // Work of unknown length (a gated start, a two-hop device hop) ends the prediction,
        // but whatever is queued behind it may wait until it is seen complete.
        let gated = b.queue(d, t0 + us(600), None);
        let after = b.queue(d, t0 + us(610), Some(us(100)));
        assert_eq!((after.behind, after.may_wait), (Duration::ZERO, true));
        // A later number seen first covers the earlier ones; an earlier one seen late does not
        // undo it.
        b.seen(d, after.number);
        b.seen(d, gated.number);
        assert!(!b.queue(d, t0 + us(900), Some(us(100))).may_wait);
        // Other streams are unaffected.
        assert!(!b.queue(Direction::DeviceToHost, t0, None).may_wait);
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
