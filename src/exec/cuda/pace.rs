//! What each copy direction of a device has been moving per microsecond, learned from finished
//! transfers. A waiter uses it to sleep until shortly before a transfer should end and then
//! watch the transfer's event itself: waking a sleeping thread (on a VM, a halted vCPU) costs
//! tens of microseconds, which is a large share of a sub-millisecond device-to-device copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::device::Direction;

/// Transfers smaller than this say more about fixed costs than about bandwidth.
const MIN_BYTES: u64 = 4 << 20;

#[derive(Debug, Default)]
pub struct Pace {
    /// Bytes per microsecond by direction; 0 = nothing learned yet.
    bytes_per_us: [AtomicU64; 3],
}

impl Pace {
    /// How long `bytes` should take in direction `d`, once something was learned.
    pub fn expected(&self, d: Direction, bytes: u64) -> Option<Duration> {
        let rate = self.bytes_per_us[d as usize].load(Ordering::Relaxed);
        (rate > 0).then(|| Duration::from_micros(bytes / rate))
    }

    /// A transfer of `bytes` in direction `d` took `elapsed` from submit to completion.
    pub fn learn(&self, d: Direction, bytes: u64, elapsed: Duration) {
        if bytes < MIN_BYTES {
            return;
        }
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let sample = (bytes / us).max(1);
        let slot = &self.bytes_per_us[d as usize];
        let old = slot.load(Ordering::Relaxed);
        // A moving average: one odd transfer (queued behind others) moves it by a quarter.
        let new = if old == 0 {
            sample
        } else {
            (old.saturating_mul(3) + sample) / 4
        };
        slot.store(new.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_from_large_transfers_only() {
        let p = Pace::default();
        assert_eq!(p.expected(Direction::DeviceToDevice, 1 << 30), None);
        p.learn(Direction::DeviceToDevice, 4096, Duration::from_micros(20));
        assert_eq!(p.expected(Direction::DeviceToDevice, 1 << 30), None);
        // 1 GiB in 500 µs, then the same again: 1 GiB is expected to take 500 µs.
        p.learn(
            Direction::DeviceToDevice,
            1 << 30,
            Duration::from_micros(500),
        );
        p.learn(
            Direction::DeviceToDevice,
            1 << 30,
            Duration::from_micros(500),
        );
        let e = p.expected(Direction::DeviceToDevice, 1 << 30).unwrap();
        assert!((499..=501).contains(&e.as_micros()), "{e:?}");
        assert_eq!(p.expected(Direction::HostToDevice, 1 << 30), None);
    }
}
