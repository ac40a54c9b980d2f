//! The copy kernel's SM budget. Between host and device the link, not the SMs, sets the speed:
//! by Little's law the kernel needs only as many blocks as keep `link bandwidth × latency`
//! bytes in flight, and every further block takes issue slots and memory pipes from the engine
//! running beside it (with one full wave, an engine's kernels ran ~10% slower). So the budget
//! is measured once per process and device: the link (one large copy each way) and what 1, 2,
//! 3, 4, 6, ... blocks of the kernel move (each block's bytes in flight over the latency, until
//! the link caps it); host -> device gets three times the fewest blocks that reach 0.95 of the
//! best, device -> host four times, counted between the block counts tried (`reach_blocks`; on
//! an H200 ~5.6 and ~1.9 blocks of 256 threads, so 17 and 8).
//! Until session 13 the kernel's general item loop (64-bit divisions, the small-piece path)
//! made a block beside an engine's tensor-core kernels move 4 KiB pieces at a fraction of its
//! idle speed, by machine (D2H on 4 blocks: 0.31 or 0.88 of the link); the lean loop
//! (copy_blocks.cu) moves them at the link on 8 blocks in either direction, in device time.
//! What a runtime sees from submit to wait also carries the submit (0.3 ms for 65536 block
//! pairs on a thread that slept through an engine's kernel, session 14), which the extra host
//! -> device blocks make up for in part (`SHARED_SM_FACTOR`). Blocks are
//! not given SMs of their own: an engine kernel sized to one wave (a persistent GEMM, a
//! per-layer kernel of one block per SM) would then run a second wave for the blocks kvxfer
//! displaced. Device <-> device is bound by memory bandwidth and takes one full wave. A
//! `max_sms` the runtime sets is what every direction takes.

use std::sync::Mutex;

use cudarc::driver::sys;

use super::kernel::Kernel;
use crate::cuda::{CudaDevice, Direction, check};
use crate::error::Result;
use crate::plan::CopyOp;

/// Bytes each measurement moves: long enough that launch costs fade (~0.3 ms on the link).
const PROBE: usize = 16 << 20;
/// Pieces of the probe: a KV region of 16 tokens of one layer's heads.
const PROBE_PIECE: u64 = 16 << 10;
/// Block counts tried, in order.
const TRIED: [u32; 10] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32];
/// Enough blocks reach this share of the best rate measured.
const REACH: f64 = 0.95;

/// Blocks per direction; `u32::MAX` is one full wave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    ctas: [u32; 3],
    /// `max_sms`, or `u32::MAX` without one.
    cap: u32,
}

/// How many times the fewest blocks that reach the link alone host -> device and device ->
/// host take, so that they still move it beside an engine. Host -> device on 6 x 2 = 12
/// blocks moved 4 KiB pieces at 0.83-0.86 of the link beside the bench's load, on 16 at
/// 0.86-0.87, 20 no more, the load slowed 0.2-0.3% either way (session 13, device run 8).
const SHARED_SM_FACTOR: [u32; 2] = [3, 4];

/// Bytes a warp has in flight with one small piece.
const WARP_BYTES: u64 = 4096;
/// A transfer the budget's blocks carry in at most this many rounds of one small piece per
/// warp is short.
const SHORT_ROUNDS: u64 = 16;
/// A short transfer may take this many times the budget.
const SHORT_BOOST: u32 = 4;

/// What was measured on one device, to and from it: GB/s of the link, and the fewest blocks
/// that reach it (`reach_blocks`: between two block counts tried, a fraction) with what they
/// moved.
#[derive(Debug, Clone, Copy)]
struct Link {
    link_gbps: [f64; 2],
    blocks: [f64; 2],
    blocks_gbps: [f64; 2],
    one_block_gbps: [f64; 2],
}

/// Measured once per process and device ordinal (every context of the device shares it).
static LINKS: Mutex<Vec<(i32, Option<Link>)>> = Mutex::new(Vec::new());

impl Budget {
    /// No budget: one full wave everywhere.
    pub(crate) fn full() -> Self {
        Self {
            ctas: [u32::MAX; 3],
            cap: u32::MAX,
        }
    }

    /// The budget on `dev` for `kernel` under `max_sms` (0 = auto).
    pub(crate) fn new(dev: &CudaDevice, kernel: &Kernel, max_sms: u32) -> Self {
        let cap = if max_sms == 0 {
            u32::MAX
        } else {
            max_sms.min(dev.sm_count)
        };
        let link = if max_sms != 0 {
            None
        } else {
            let mut links = LINKS.lock().unwrap_or_else(|p| p.into_inner());
            match links.iter().find(|(o, _)| *o == dev.ordinal) {
                Some((_, l)) => *l,
                None => {
                    let l = measure(dev, kernel)
                        .inspect_err(|e| {
                            tracing::warn!(
                                "CUDA device {}: could not measure the host link ({e}); the \
                                 copy kernel takes one full wave of SMs (set max_sms to \
                                 bound it)",
                                dev.ordinal
                            )
                        })
                        .ok();
                    links.push((dev.ordinal, l));
                    l
                }
            }
        };
        let host = |i: usize| -> u32 {
            // Without a measurement (or with a budget the runtime set): the cap.
            let Some(l) = link else { return cap };
            // Blocks that share their SMs with an engine's warps move a third (H2D) to a
            // quarter (D2H) of what they move alone.
            let n = (f64::from(SHARED_SM_FACTOR[i]) * l.blocks[i]).ceil() as u32;
            n.clamp(1, dev.sm_count).min(cap)
        };
        let this = Self {
            ctas: [host(0), host(1), cap],
            cap,
        };
        if let Some(l) = link {
            tracing::debug!(
                "CUDA device {}: host->device link {:.1} GB/s, one block {:.1}, {:.1} blocks \
                 {:.1}: {} blocks; device->host link {:.1} GB/s, one block {:.1}, {:.1} blocks \
                 {:.1}: {} blocks; device<->device {}",
                dev.ordinal,
                l.link_gbps[0],
                l.one_block_gbps[0],
                l.blocks[0],
                l.blocks_gbps[0],
                this.ctas[0],
                l.link_gbps[1],
                l.one_block_gbps[1],
                l.blocks[1],
                l.blocks_gbps[1],
                this.ctas[1],
                if cap == u32::MAX {
                    "one full wave".to_string()
                } else {
                    format!("{cap} blocks")
                }
            );
        }
        this
    }

    /// Blocks a launch in `d` may take.
    pub(crate) fn ctas(&self, d: Direction) -> u32 {
        self.ctas[d as usize]
    }

    /// Blocks for a launch of `bytes` in `d`. A short host <-> device transfer (a layer, a few
    /// blocks) is bound by latency, not by the link: it may take up to SHORT_BOOST times the
    /// budget, so that all of it is in flight at once, since it holds those SMs for
    /// microseconds only.
    pub(crate) fn launch(&self, d: Direction, bytes: u64, warps_per_block: u32) -> u32 {
        let base = self.ctas(d);
        if d == Direction::DeviceToDevice || base == u32::MAX {
            return base;
        }
        let block_bytes = WARP_BYTES * u64::from(warps_per_block.max(1));
        if bytes > u64::from(base) * block_bytes * SHORT_ROUNDS {
            return base;
        }
        let all_at_once = u32::try_from(bytes.div_ceil(block_bytes)).unwrap_or(u32::MAX);
        all_at_once
            .clamp(base, base.saturating_mul(SHORT_BOOST))
            .min(self.cap)
    }
}

/// Timing events and buffers of one measurement, released on drop.
struct Probe {
    host: *mut std::ffi::c_void,
    device: u64,
    events: [sys::CUevent; 2],
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: each handle was made by `measure` (or is null/0) and is released once, after
        // the stream that used them was synchronized.
        unsafe {
            for e in self.events {
                if !e.is_null() {
                    sys::cuEventDestroy_v2(e);
                }
            }
            if !self.host.is_null() {
                sys::cuMemFreeHost(self.host);
            }
            if self.device != 0 {
                sys::cuMemFree_v2(self.device);
            }
        }
    }
}

impl Probe {
    /// Milliseconds `queue` takes on `stream`, best of `reps`.
    fn time(
        &self,
        stream: sys::CUstream,
        reps: usize,
        mut queue: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..reps {
            // SAFETY: live events of this context, recorded on one of its streams.
            unsafe {
                check(sys::cuEventRecord(self.events[0], stream), "cuEventRecord")?;
                queue()?;
                check(sys::cuEventRecord(self.events[1], stream), "cuEventRecord")?;
                check(
                    sys::cuEventSynchronize(self.events[1]),
                    "cuEventSynchronize",
                )?;
                let mut ms = 0f32;
                check(
                    sys::cuEventElapsedTime(&mut ms, self.events[0], self.events[1]),
                    "cuEventElapsedTime",
                )?;
                best = best.min(f64::from(ms).max(1e-4));
            }
        }
        Ok(best)
    }
}

/// Where the curve of (blocks, GB/s) first reaches REACH of its best rate (the kernel's own
/// best, a little below the copy engines' link at these pieces), and that rate:
/// between the two block counts tried around it, the count where a straight line between them
/// crosses. Taking the count tried instead turned a percent of noise into a third more blocks
/// (6 or 8 on one H200, 18 or 24 with SHARED_SM_FACTOR, from one process to the next: layer by
/// layer beside an engine overlapped 1.037 on 18 and 1.109 on 24, session 14, device runs 9 and
/// 11).
fn reach_blocks(curve: &[(u32, f64)]) -> (f64, f64) {
    let best = curve.iter().map(|c| c.1).fold(0.0, f64::max);
    let want = REACH * best;
    let Some(k) = curve.iter().position(|c| c.1 >= want) else {
        return curve.last().map_or((1.0, 0.0), |c| (f64::from(c.0), c.1));
    };
    let (n, gbps) = curve[k];
    let Some(&(m, below)) = k.checked_sub(1).and_then(|p| curve.get(p)) else {
        return (f64::from(n), gbps);
    };
    let t = ((want - below) / (gbps - below)).clamp(0.0, 1.0);
    (f64::from(m) + t * f64::from(n - m), want.max(below))
}

/// The link and one block of `kernel`'s list entry, each way, on `dev`'s streams.
fn measure(dev: &CudaDevice, kernel: &Kernel) -> Result<Link> {
    dev.bind()?;
    let mut p = Probe {
        host: std::ptr::null_mut(),
        device: 0,
        events: [std::ptr::null_mut(); 2],
    };
    // SAFETY: the context is current; out pointers are fields of `p`, released by its Drop.
    unsafe {
        check(
            sys::cuMemHostAlloc(&mut p.host, PROBE, sys::CU_MEMHOSTALLOC_PORTABLE),
            "cuMemHostAlloc (link probe)",
        )?;
        check(
            sys::cuMemAlloc_v2(&mut p.device, PROBE),
            "cuMemAlloc (link probe)",
        )?;
        for e in &mut p.events {
            check(sys::cuEventCreate(e, 0), "cuEventCreate")?;
        }
    }
    let (host, device) = (p.host as u64, p.device);
    let mut link = Link {
        link_gbps: [0.0; 2],
        blocks: [1.0; 2],
        blocks_gbps: [0.0; 2],
        one_block_gbps: [0.0; 2],
    };
    for (i, d) in [Direction::HostToDevice, Direction::DeviceToHost]
        .into_iter()
        .enumerate()
    {
        let stream = dev.stream(d);
        let to_device = d == Direction::HostToDevice;
        // The first copies also bring the GPU's clocks up: the best of five.
        let ms = p.time(stream, 5, || {
            // SAFETY: both buffers hold PROBE bytes; the host one is pinned.
            let r = unsafe {
                if to_device {
                    sys::cuMemcpyHtoDAsync_v2(device, p.host, PROBE, stream)
                } else {
                    sys::cuMemcpyDtoHAsync_v2(p.host, device, PROBE, stream)
                }
            };
            check(r, "link probe copy")
        })?;
        link.link_gbps[i] = PROBE as f64 / ms / 1e6;
        let (src, dst) = if to_device {
            (host, device)
        } else {
            (device, host)
        };
        let copies: Vec<CopyOp> = (0..PROBE as u64 / PROBE_PIECE)
            .map(|k| CopyOp {
                src: src + k * PROBE_PIECE,
                dst: dst + k * PROBE_PIECE,
                len: PROBE_PIECE,
            })
            .collect();
        let mut curve = Vec::new();
        for n in TRIED.into_iter().filter(|&n| n <= dev.sm_count) {
            let mut tables = Vec::new();
            let timed = p.time(stream, 3, || {
                // SAFETY: every copy lies in the two probe buffers, which outlive the stream's
                // work (synchronized by `time` before they are freed).
                let (t, _) = unsafe { kernel.enqueue_list(dev, stream, &copies, n) }?;
                tables.push(t);
                Ok(())
            });
            for t in tables {
                dev.recycle_table(t);
            }
            curve.push((n, PROBE as f64 / timed? / 1e6));
        }
        tracing::trace!(device = dev.ordinal, direction = ?d, ?curve, "blocks -> GB/s");
        let (n, gbps) = reach_blocks(&curve);
        link.blocks[i] = n;
        link.blocks_gbps[i] = gbps;
        link.one_block_gbps[i] = curve.first().map_or(0.0, |c| c.1);
    }
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::reach_blocks;

    #[test]
    fn the_blocks_that_reach_the_link_move_with_the_rates_not_in_steps() {
        // An H200's host -> device curve (session 14, device run 2): 4 blocks 0.87 of the
        // best, 6 blocks 0.97: 95% is crossed at ~5.6 blocks.
        let h2d = [
            (1, 12.3),
            (2, 24.2),
            (3, 34.5),
            (4, 42.8),
            (6, 47.8),
            (8, 49.2),
            (12, 48.4),
        ];
        let (n, gbps) = reach_blocks(&h2d);
        assert!((5.5..5.8).contains(&n), "{n}");
        assert!((46.7..46.8).contains(&gbps), "{gbps}");
        // Six blocks a percent slower: a little more than six, not eight.
        let slower = [(4, 42.8), (6, 46.5), (8, 49.2)];
        let (n, _) = reach_blocks(&slower);
        assert!((6.0..6.5).contains(&n), "{n}");
        // The first count already there, a flat curve, a single point, nothing measured.
        assert_eq!(reach_blocks(&[(1, 43.0), (2, 44.0)]).0, 1.0);
        assert_eq!(reach_blocks(&[(1, 10.0), (2, 10.0)]).0, 1.0);
        assert_eq!(reach_blocks(&[(4, 30.0)]), (4.0, 30.0));
        assert_eq!(reach_blocks(&[]), (1.0, 0.0));
    }
}
