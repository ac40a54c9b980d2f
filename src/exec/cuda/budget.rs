//! The copy kernel's SM budget. Between host and device the link, not the SMs, sets the speed:
//! by Little's law the kernel needs only as many blocks as keep `link bandwidth × latency`
//! bytes in flight, and every further block takes an SM from the engine running beside it
//! (with one full wave, an engine's kernels ran ~10% slower). So the budget is measured once
//! per process and device: the link (one large copy each way) and what one block moves alone
//! (its bytes in flight over the latency); host <-> device gets `MARGIN × link / one block`
//! blocks. Device <-> device is bound by memory bandwidth and takes one full wave unless
//! `max_sms` caps it; `max_sms` caps every direction.

use std::sync::Mutex;

use cudarc::driver::sys;

use super::kernel::Kernel;
use crate::cuda::{CudaDevice, Direction, check};
use crate::error::Result;
use crate::plan::CopyOp;

/// Blocks beyond the estimate: the link's latency varies, and blocks beside an engine's get
/// fewer issue slots than alone.
const MARGIN: f64 = 1.5;
/// Bytes each measurement moves: long enough that launch costs vanish (~0.15 ms on the link).
const PROBE: usize = 8 << 20;
/// Copies of the probe: the kernel's piece size.
const PROBE_PIECE: u64 = 64 << 10;

/// Blocks per direction; `u32::MAX` is one full wave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    ctas: [u32; 3],
}

/// What was measured on one device: GB/s of the link and of one block, to and from it.
#[derive(Debug, Clone, Copy)]
struct Link {
    link_gbps: [f64; 2],
    block_gbps: [f64; 2],
}

/// Measured once per process and device ordinal (every context of the device shares it).
static LINKS: Mutex<Vec<(i32, Option<Link>)>> = Mutex::new(Vec::new());

impl Budget {
    /// No budget: one full wave everywhere.
    pub(crate) fn full() -> Self {
        Self {
            ctas: [u32::MAX; 3],
        }
    }

    /// The budget on `dev` for `kernel` under `max_sms` (0 = auto).
    pub(crate) fn new(dev: &CudaDevice, kernel: &Kernel, max_sms: u32) -> Self {
        let cap = if max_sms == 0 {
            u32::MAX
        } else {
            max_sms.min(dev.sm_count)
        };
        let link = {
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
            let Some(l) = link else { return cap };
            let need = (MARGIN * l.link_gbps[i] / l.block_gbps[i].max(0.1)).ceil();
            (need as u32).clamp(1, dev.sm_count).min(cap)
        };
        let this = Self {
            ctas: [host(0), host(1), cap],
        };
        if let Some(l) = link {
            tracing::debug!(
                "CUDA device {}: host->device {:.1} GB/s, one block {:.1} GB/s: {} blocks; \
                 device->host {:.1} GB/s, one block {:.1} GB/s: {} blocks; device<->device {}",
                dev.ordinal,
                l.link_gbps[0],
                l.block_gbps[0],
                this.ctas[0],
                l.link_gbps[1],
                l.block_gbps[1],
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
        block_gbps: [0.0; 2],
    };
    for (i, d) in [Direction::HostToDevice, Direction::DeviceToHost]
        .into_iter()
        .enumerate()
    {
        let stream = dev.stream(d);
        let to_device = d == Direction::HostToDevice;
        let ms = p.time(stream, 3, || {
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
        let mut tables = Vec::new();
        let timed = p.time(stream, 2, || {
            // SAFETY: every copy lies in the two probe buffers, which outlive the stream's
            // work (synchronized by `time` before they are freed).
            let (t, _) = unsafe { kernel.enqueue_list(dev, stream, &copies, 1) }?;
            tables.push(t);
            Ok(())
        });
        for t in tables {
            dev.recycle_table(t);
        }
        link.block_gbps[i] = PROBE as f64 / timed? / 1e6;
    }
    Ok(link)
}
