//! Two-hop transfers through the context's pool of pinned bounce buffers, the seed's plans:
//! disk -> disk is NixlReadFlipped into a bounce buffer, then NixlWrite out of it; device ->
//! disk is a device-to-host copy into the buffer, then NixlWrite; disk -> device is
//! NixlReadFlipped into the buffer, then a host-to-device copy. Chunks alternate between the
//! two buffers of a pair, so the first hop of chunk k+1 overlaps the second hop of chunk k;
//! memory stays bounded (at most MAX_PAIRS pairs of CHUNK-byte buffers), and a job that finds
//! every pair in use waits for one.

use std::sync::{Arc, Condvar, Mutex};

use cudarc::driver::sys::{self, CUevent};
use nixl_sys::{Agent, XferRequest};

use crate::error::{Error, Result};
use crate::exec::cuda::copy::{AUTO_KERNEL_MAX_AVG, enqueue_copy_engine};
use crate::exec::cuda::{CudaDevice, Direction, TableBuffer, check};
use crate::exec::nixl::xfer::{Xfer, direct_fd, finish, start};
use crate::memory::Memory;
use crate::plan::CopyOp;
use crate::plan::copy_list::sort_by_dst;

/// Bytes of one bounce buffer: one chunk of the pipeline. Each chunk is one NIXL request, in
/// flight one at a time per direction: larger chunks give the disk deeper queues (on the GPU
/// machine's virtio disk, 8 MiB reads ran at the speed of a raw 8 MiB pread loop, 1.7-1.9 GB/s,
/// against 2.2-2.3 for one large request; device run 14).
pub const CHUNK: u64 = 16 << 20;
/// Pairs of buffers at most, however many two-hop transfers run at once.
pub const MAX_PAIRS: usize = 2;

type Pair = [Arc<Memory>; 2];

#[derive(Debug, Default)]
pub struct BouncePool {
    state: Mutex<(Vec<Pair>, usize)>,
    returned: Condvar,
}

/// A pair taken from the pool; it goes back when dropped.
pub struct Lease<'a> {
    pool: &'a BouncePool,
    pair: Option<Pair>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pair.take() {
            let mut s = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0.push(p);
            self.pool.returned.notify_one();
        }
    }
}

impl BouncePool {
    /// A free pair, a new one made with `make` while fewer than MAX_PAIRS exist, or else the next
    /// one returned.
    pub fn take(&self, make: impl Fn() -> Result<Arc<Memory>>) -> Result<Lease<'_>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(p) = s.0.pop() {
                return Ok(Lease {
                    pool: self,
                    pair: Some(p),
                });
            }
            if s.1 < MAX_PAIRS {
                s.1 += 1;
                drop(s);
                let made = make().and_then(|a| Ok([a, make()?]));
                return match made {
                    Ok(pair) => Ok(Lease {
                        pool: self,
                        pair: Some(pair),
                    }),
                    Err(e) => {
                        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                        s.1 -= 1;
                        Err(e)
                    }
                };
            }
            s = self.returned.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Cuts (src offset, dst offset, len) copies into chunks of at most CHUNK bytes each.
fn chunks(copies: &[CopyOp]) -> Vec<Vec<CopyOp>> {
    let mut out = vec![Vec::new()];
    let mut room = CHUNK;
    for &c in copies {
        let mut c = c;
        while c.len > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = CHUNK;
            }
            let n = c.len.min(room);
            out.last_mut()
                .expect("non-empty")
                .push(CopyOp { len: n, ..c });
            c = CopyOp {
                src: c.src + n,
                dst: c.dst + n,
                len: c.len - n,
            };
            room -= n;
        }
    }
    out.retain(|c| !c.is_empty());
    out
}

/// One hop of one chunk, in flight.
enum InFlight<'d> {
    Nixl(Option<XferRequest>),
    /// Copies queued on `dev`'s stream, done when the event is; the copy kernel's list table
    /// goes back to the pool then.
    Cuda(&'d CudaDevice, CUevent, Option<TableBuffer>),
}

impl InFlight<'_> {
    fn wait(self, agent: &Agent) -> Result<()> {
        match self {
            InFlight::Nixl(r) => finish(agent, r, Error::Io, true),
            InFlight::Cuda(dev, event, table) => {
                // SAFETY: a pooled event of `dev`, recorded after this hop's copies; the
                // pool's events are blocking-sync, so this thread sleeps.
                let r = check(
                    unsafe { sys::cuEventSynchronize(event) },
                    "copying through the bounce buffer",
                );
                dev.recycle_event(event);
                // After a failed wait the stream may not have passed the table: it stays out of
                // the pool (its pinned memory is leaked, not reused under a running kernel).
                if let Some(t) = table.filter(|_| r.is_ok()) {
                    dev.recycle_table(t);
                }
                r
            }
        }
    }
}

/// Which hop of a chunk to start first when both buffers are busy. A CUDA hop's start blocks
/// the calling thread for as long as the driver takes to queue its copies (milliseconds for an
/// 8 MiB chunk of 4 KiB host-to-device copies, device run 11), so the NIXL hop, whose start
/// returns at once, goes first and runs meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Empty buffer i before filling the other one (the fill is the CUDA hop).
    DrainFirst,
    /// Fill the other buffer before emptying buffer i (the drain is the CUDA hop).
    FillFirst,
}

/// Runs `n` chunks through the two buffers: `first(i)` fills buffer `i % 2` with chunk i,
/// `second(i)` empties it. Everything started is finished before this returns, also on an
/// error, because the buffers go back to the pool.
fn pipeline<H>(
    n: usize,
    order: Order,
    mut first: impl FnMut(usize) -> Result<H>,
    mut second: impl FnMut(usize) -> Result<H>,
    wait: impl Fn(H) -> Result<()>,
) -> Result<()> {
    // Hops started and not yet waited for, oldest first.
    let mut flight: Vec<H> = Vec::new();
    let mut run = |flight: &mut Vec<H>| -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        wait(first(0)?)?;
        for i in 0..n {
            match order {
                Order::DrainFirst => {
                    // flight: [second(i - 1)]
                    flight.push(second(i)?);
                    // The other buffer is free once the previous chunk left it.
                    if flight.len() > 1 {
                        wait(flight.remove(0))?;
                    }
                    if i + 1 < n {
                        wait(first(i + 1)?)?;
                    }
                }
                Order::FillFirst => {
                    // flight: [second(i - 1)]
                    if let Some(d) = flight.pop() {
                        wait(d)?;
                    }
                    if i + 1 < n {
                        flight.push(first(i + 1)?);
                    }
                    flight.push(second(i)?);
                    if i + 1 < n {
                        wait(flight.remove(0))?;
                    }
                }
            }
        }
        Ok(())
    };
    let r = run(&mut flight);
    // On an error, let what is still running finish; its own errors add nothing.
    let mut rest = Ok(());
    for f in flight {
        let w = wait(f);
        if rest.is_ok() {
            rest = w;
        }
    }
    r.and(rest)
}

/// Each piece of `chunk` packed into the buffer at `base`, as (buffer address, the piece's
/// address on the other side, length); `from_src`: the other side is the piece's source.
fn pack(chunk: &[CopyOp], base: u64, from_src: bool) -> Vec<CopyOp> {
    let mut at = base;
    chunk
        .iter()
        .map(|c| {
            let p = CopyOp {
                src: at,
                dst: if from_src { c.src } else { c.dst },
                len: c.len,
            };
            at += c.len;
            p
        })
        .collect()
}

/// The NIXL hop between a bounce buffer and a disk: a read of the chunk's sources into the
/// buffer (`read`), or a write of the buffer to the chunk's destinations.
fn disk_hop<'d>(
    agent: &Agent,
    buf: &Arc<Memory>,
    disk: &Arc<Memory>,
    chunk: &[CopyOp],
    read: bool,
) -> Result<InFlight<'d>> {
    let mut pieces = pack(chunk, buf.regions()[0].addr, read);
    // Ascending file offsets; pieces next to each other on disk and in the buffer merge.
    sort_by_dst(&mut pieces);
    let name = agent.name();
    let t = Xfer {
        write: !read,
        local: buf,
        remote: disk,
        remote_agent: &name,
        copies: &pieces,
        notify: None,
        remote_fd: direct_fd(disk, &pieces),
    };
    Ok(InFlight::Nixl(start(agent, &t, Error::Io)?))
}

/// The CUDA hop between a bounce buffer and device memory, on the device's stream for that
/// direction: device -> buffer (`to_buffer`) or buffer -> device.
fn device_hop<'d>(
    dev: &'d CudaDevice,
    buf: &Arc<Memory>,
    chunk: &[CopyOp],
    to_buffer: bool,
) -> Result<InFlight<'d>> {
    let base = buf.regions()[0].addr;
    let (direction, copies) = if to_buffer {
        let copies: Vec<CopyOp> = pack(chunk, base, true)
            .into_iter()
            .map(|p| CopyOp {
                src: p.dst,
                dst: p.src,
                len: p.len,
            })
            .collect();
        (Direction::DeviceToHost, copies)
    } else {
        (Direction::HostToDevice, pack(chunk, base, false))
    };
    dev.bind()?;
    let stream = dev.stream(direction);
    // Small pieces go to the copy kernel: on copy engines a 16 MiB chunk of 4 KiB copies took
    // milliseconds of driver time to queue and ran at ~9 GB/s, against the kernel's ~50 GB/s
    // to and from pinned memory.
    let bytes: u64 = copies.iter().map(|c| c.len).sum();
    let kernel = dev
        .kernel()
        .ok()
        .filter(|k| k.has_list() && bytes <= AUTO_KERNEL_MAX_AVG * copies.len() as u64);
    let table = match kernel {
        // SAFETY: the stream belongs to `dev`; the device ranges were validated with the
        // request, the buffer is CUDA-pinned and holds the chunk; the caller keeps every memory
        // alive until this hop is waited for.
        Some(k) => Some(unsafe { k.enqueue_list(dev, stream, &copies) }?),
        // SAFETY: as above.
        None => {
            unsafe { enqueue_copy_engine(dev, stream, direction, &copies) }?;
            None
        }
    };
    let event = dev.event()?;
    // SAFETY: a live event and stream of this device.
    if let Err(e) = check(
        unsafe { sys::cuEventRecord(event, stream) },
        "cuEventRecord",
    ) {
        // SAFETY: what was queued must finish before the buffer goes back to the pool.
        unsafe { sys::cuStreamSynchronize(stream) };
        dev.recycle_event(event);
        if let Some(t) = table {
            dev.recycle_table(t);
        }
        return Err(e);
    }
    Ok(InFlight::Cuda(dev, event, table))
}

fn lease_pair<'l>(lease: &'l Lease<'_>) -> Result<&'l Pair> {
    lease
        .pair
        .as_ref()
        .ok_or_else(|| Error::Internal("empty bounce lease".into()))
}

/// The two ends of a two-hop transfer.
pub enum Ends<'a> {
    /// NIXL reads into the buffers, NIXL writes out of them.
    DiskToDisk {
        src: &'a Arc<Memory>,
        dst: &'a Arc<Memory>,
    },
    /// Device-to-host copies into the buffers, NIXL writes out of them.
    DeviceToDisk {
        dev: &'a CudaDevice,
        dst: &'a Arc<Memory>,
    },
    /// NIXL reads into the buffers, host-to-device copies out of them.
    DiskToDevice {
        dev: &'a CudaDevice,
        src: &'a Arc<Memory>,
    },
}

/// Moves `copies` between `ends` through `lease`'s two buffers, on the calling (worker)
/// thread.
pub fn run(agent: &Agent, ends: Ends<'_>, copies: &[CopyOp], lease: &Lease<'_>) -> Result<()> {
    let pair = lease_pair(lease)?;
    // In file-offset order of the disk side that sets the pace: a write's destinations, or
    // the sources of disk -> device. Each chunk's disk request is then ascending and its
    // neighbours merge; the disk reads ahead.
    let mut copies = copies.to_vec();
    match ends {
        Ends::DiskToDevice { .. } => copies.sort_unstable_by_key(|c| c.src),
        _ => sort_by_dst(&mut copies),
    }
    let chunks = chunks(&copies);
    let fill = |i: usize| match ends {
        Ends::DiskToDisk { src, .. } | Ends::DiskToDevice { src, .. } => {
            disk_hop(agent, &pair[i % 2], src, &chunks[i], true)
        }
        Ends::DeviceToDisk { dev, .. } => device_hop(dev, &pair[i % 2], &chunks[i], true),
    };
    let drain = |i: usize| match ends {
        Ends::DiskToDisk { dst, .. } | Ends::DeviceToDisk { dst, .. } => {
            disk_hop(agent, &pair[i % 2], dst, &chunks[i], false)
        }
        Ends::DiskToDevice { dev, .. } => device_hop(dev, &pair[i % 2], &chunks[i], false),
    };
    let order = match ends {
        Ends::DiskToDevice { .. } => Order::FillFirst,
        _ => Order::DrainFirst,
    };
    pipeline(chunks.len(), order, fill, drain, |h| h.wait(agent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ev {
        Fill(usize),
        Drain(usize),
        /// A hop waited for: (was it a fill, its chunk).
        Done(bool, usize),
        /// The start that `fail` names, refused.
        Failed,
    }

    /// Runs the pipeline over fake hops that log what happens; `fail` makes the start of that
    /// hop (a fill or a drain of that chunk) fail.
    fn simulate(n: usize, order: Order, fail: Option<Ev>) -> (Result<()>, Vec<Ev>) {
        let log = RefCell::new(Vec::new());
        let start = |e: Ev, hop: (bool, usize)| {
            if Some(e) == fail {
                log.borrow_mut().push(Ev::Failed);
                return Err(Error::Io("refused".into()));
            }
            log.borrow_mut().push(e);
            Ok(hop)
        };
        let r = pipeline(
            n,
            order,
            |i| start(Ev::Fill(i), (true, i)),
            |i| start(Ev::Drain(i), (false, i)),
            |(fill, i)| {
                log.borrow_mut().push(Ev::Done(fill, i));
                Ok(())
            },
        );
        (r, log.into_inner())
    }

    fn at(log: &[Ev], e: Ev) -> usize {
        log.iter()
            .position(|x| *x == e)
            .unwrap_or_else(|| panic!("{e:?} missing: {log:?}"))
    }

    #[test]
    fn pipeline_never_reuses_a_buffer_early_and_overlaps_the_hops() {
        for order in [Order::DrainFirst, Order::FillFirst] {
            for n in 0..7 {
                let (r, log) = simulate(n, order, None);
                r.unwrap();
                assert_eq!(log.len(), 4 * n, "{log:?}");
                for i in 0..n {
                    // A chunk leaves its buffer only after it arrived there.
                    assert!(at(&log, Ev::Done(true, i)) < at(&log, Ev::Drain(i)));
                    // Buffer i % 2 is filled again only after chunk i - 2 left it.
                    if i >= 2 {
                        assert!(at(&log, Ev::Done(false, i - 2)) < at(&log, Ev::Fill(i)));
                    }
                    // The two hops of neighbouring chunks run at the same time.
                    if i + 1 < n {
                        let (fill_next, drain) =
                            (at(&log, Ev::Fill(i + 1)), at(&log, Ev::Drain(i)));
                        let drained = at(&log, Ev::Done(false, i));
                        assert!(fill_next < drained && drain < at(&log, Ev::Done(true, i + 1)));
                        match order {
                            Order::FillFirst => assert!(fill_next < drain, "{log:?}"),
                            Order::DrainFirst => assert!(drain < fill_next, "{log:?}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pipeline_waits_for_everything_it_started_when_a_hop_fails() {
        for order in [Order::DrainFirst, Order::FillFirst] {
            for fail in [
                Ev::Fill(0),
                Ev::Fill(3),
                Ev::Drain(0),
                Ev::Drain(2),
                Ev::Drain(5),
            ] {
                let (r, log) = simulate(6, order, Some(fail));
                assert!(r.is_err(), "{order:?} {fail:?}");
                let started: Vec<Ev> = log
                    .iter()
                    .copied()
                    .filter(|e| matches!(e, Ev::Fill(_) | Ev::Drain(_)))
                    .collect();
                for e in &started {
                    let done = match *e {
                        Ev::Fill(i) => Ev::Done(true, i),
                        Ev::Drain(i) => Ev::Done(false, i),
                        _ => unreachable!(),
                    };
                    assert_eq!(
                        log.iter().filter(|x| **x == done).count(),
                        1,
                        "{fail:?}: {log:?}"
                    );
                }
                // Nothing starts after the refused hop.
                let failed = at(&log, Ev::Failed);
                assert!(
                    log[failed..]
                        .iter()
                        .all(|e| !matches!(e, Ev::Fill(_) | Ev::Drain(_))),
                    "{fail:?}: {log:?}"
                );
            }
        }
    }

    #[test]
    fn chunks_cover_every_byte_once() {
        let copies = vec![
            CopyOp {
                src: 0,
                dst: 1 << 40,
                len: CHUNK + 5,
            },
            CopyOp {
                src: 3 << 30,
                dst: 2 << 40,
                len: 7,
            },
        ];
        let c = chunks(&copies);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            vec![CopyOp {
                src: 0,
                dst: 1 << 40,
                len: CHUNK
            }]
        );
        assert_eq!(
            c[1],
            vec![
                CopyOp {
                    src: CHUNK,
                    dst: (1 << 40) + CHUNK,
                    len: 5
                },
                CopyOp {
                    src: 3 << 30,
                    dst: 2 << 40,
                    len: 7
                },
            ]
        );
        assert!(chunks(&[]).is_empty());
    }
}
