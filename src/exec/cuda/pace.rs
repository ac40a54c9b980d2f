//! What each copy direction and mechanism (copy engines or the SM kernel) of a device has been
//! moving per microsecond, learned from finished transfers. A waiter uses it to sleep until shortly before a transfer should end and then
//! watch the transfer's event itself: waking a sleeping thread (on a VM, a halted vCPU) costs
//! tens of microseconds, which is a large share of a sub-millisecond device-to-device copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::device::Direction;

/// Transfers smaller than this say more about fixed costs than about bandwidth.
const MIN_BYTES: u64 = 4 << 20;

#[derive(Debug, Default)]
pub struct Pace {
    /// Bytes per microsecond by direction, then copy engines (0) or kernel (1); 0 = nothing
    /// learned yet.
    bytes_per_us: [[AtomicU64; 2]; 3],
}

impl Pace {
    fn slot(&self, d: Direction, kernel: bool) -> &AtomicU64 {
        &self.bytes_per_us[d as usize][usize::from(kernel)]
    }

    /// How long `bytes` should take in direction `d` on the kernel or the copy engines, once
    /// something was learned.
    pub fn expected(&self, d: Direction, kernel: bool, bytes: u64) -> Option<Duration> {
        let rate = self.slot(d, kernel).load(Ordering::Relaxed);
        (rate > 0).then(|| Duration::from_micros(bytes / rate))
    }

    /// A transfer of `bytes` took `elapsed` from submit to completion.
    pub fn learn(&self, d: Direction, kernel: bool, bytes: u64, elapsed: Duration) {
        if bytes < MIN_BYTES {
            return;
        }
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let sample = (bytes / us).max(1);
        let slot = self.slot(d, kernel);
        let old = slot.load(Ordering::Relaxed);
        // The best recent rate, fading by an eighth per transfer: a transfer that waited
        // behind others looks slow, and one such must not push every later wake-up too late.
        slot.store(sample.max(old - old / 8), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_from_large_transfers_only() {
        let p = Pace::default();
        let d = Direction::DeviceToDevice;
        assert_eq!(p.expected(d, true, 1 << 30), None);
        p.learn(d, true, 4096, Duration::from_micros(20));
        assert_eq!(p.expected(d, true, 1 << 30), None);
        p.learn(d, true, 1 << 30, Duration::from_micros(500));
        let e = p.expected(d, true, 1 << 30).unwrap();
        assert!((499..=501).contains(&e.as_micros()), "{e:?}");
        // Other directions and the other mechanism learn apart.
        assert_eq!(p.expected(Direction::HostToDevice, true, 1 << 30), None);
        assert_eq!(p.expected(d, false, 1 << 30), None);
    }

    #[test]
    fn one_slow_transfer_moves_the_rate_by_an_eighth() {
        let p = Pace::default();
        let d = Direction::HostToDevice;
        p.learn(d, false, 1 << 30, Duration::from_micros(800));
        p.learn(d, false, 1 << 30, Duration::from_micros(80_000));
        let e = p.expected(d, false, 1 << 30).unwrap().as_micros();
        assert!((900..=920).contains(&e), "{e}");
        // A faster one is taken at once.
        p.learn(d, false, 1 << 30, Duration::from_micros(400));
        let e = p.expected(d, false, 1 << 30).unwrap().as_micros();
        assert!((399..=401).contains(&e), "{e}");
    }
}
