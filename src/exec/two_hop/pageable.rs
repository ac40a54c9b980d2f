//! System <-> device through the pinned bounce pool (the seed's blocking strategies): the
//! submitting thread builds the copy list chunk by chunk while the transfer's worker already
//! moves the first.

use std::sync::Arc;

use super::hops::{DeviceEnd, hop_direction, takes_kernel};
use super::pipeline::{self, Feed, chunks};
use super::{BouncePool, CHUNK, Ends, device_of, pool, run_feed, spawner};
use crate::cuda::StreamGate;
use crate::error::{Error, Result};
use crate::exec::cuda::CudaExec;
use crate::exec::workers::Workers;
use crate::memory::StorageKind;
use crate::options::{CopyMode, Mechanism, TransferStats};
use crate::plan::copy_list::CopyList;
use crate::plan::{Plan, Request};
use crate::transfer::{Completion, Transfer};

/// What the submitting thread of a pageable transfer handed its worker so far.
#[derive(Default)]
struct Sent {
    copies: u64,
    groups: usize,
    /// The worker stopped taking groups (it failed): building the rest is pointless.
    refused: bool,
}

impl Sent {
    fn send(&mut self, tx: &crossbeam_channel::Sender<pipeline::Chunks>, list: CopyList) {
        self.copies += list.copies.len() as u64;
        self.groups += 1;
        self.refused |= tx.send(chunks(&list.copies)).is_err();
    }
}

/// System <-> device (the seed's blocking strategies CudaBlockingH2D / CudaBlockingD2H) through
/// the pinned bounce pool: the host hop is memcpy between pageable memory and a bounce buffer
/// (on this worker and on idle ones), the device hop the copy kernel or the copy engines, the
/// two pipelined; `mode` picks the device hop's mechanism as for pinned memory. The pool is the
/// one the disk paths use; `gate`: start after the work queued on a caller's stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit_pageable(
    request: &Request<'_>,
    plan: Plan,
    cuda: &CudaExec,
    workers: &Workers,
    pool: &Arc<BouncePool>,
    gate: Option<Arc<StreamGate>>,
    mode: CopyMode,
) -> Result<Transfer> {
    let (src, dst) = (request.src.memory().clone(), request.dst.memory().clone());
    let to_device = dst.kind() == StorageKind::Device;
    let device_side = if to_device { &dst } else { &src };
    let dev = device_of(device_side)?;
    let kernel = match (cuda.kernel(&dev), mode) {
        (Ok(k), _) => Some(k),
        (Err(why), CopyMode::Kernel) => return Err(Error::Unavailable(why)),
        (Err(_), _) => None,
    };
    let copier = spawner(workers)?;
    // The device hop fills the buffer (device -> host) unless it goes to the device.
    let direction = hop_direction(!to_device);
    // The copy list is built in groups of block pairs of one chunk each, and the worker starts
    // on the first while this thread builds the rest: building 65536 copies took 0.4-1.5 ms on
    // the H200 machines, ~10% of a 256 MiB transfer, which the first device hop now hides.
    let built = std::time::Instant::now();
    let groups: Vec<(Request<'_>, u64)> = request.groups(CHUNK).collect();
    let bytes: u64 = groups.iter().map(|(_, b)| b).sum();
    let chunks_total: usize = groups
        .iter()
        .map(|(_, b)| usize::try_from(b.div_ceil(CHUNK)).unwrap_or(usize::MAX))
        .sum();
    let mut groups = groups.into_iter();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut sent = Sent::default();
    if let Some((g, _)) = groups.next() {
        sent.send(&tx, g.build());
    }
    let first_us = built.elapsed().as_micros() as u64;
    let completion = Completion::new(1);
    let pin_for = cuda.primary.clone();
    let pool = pool.clone();
    let keep = (src, dst);
    let device = (dev, kernel);
    let queued = std::time::Instant::now();
    // For the stats: the kernel, and the SMs it takes in this direction.
    let device_kernel = device.1.clone().map(|k| {
        let sms = k.sms(&device.0, k.ctas(direction));
        (k, sms)
    });
    workers.spawn_part(completion.clone(), gate, keep, move || {
        let started_us = queued.elapsed().as_micros() as u64;
        let lease = pool.take(|| pool::make_buffer(Some(&pin_for)))?;
        let leased_us = queued.elapsed().as_micros() as u64;
        let dev = DeviceEnd::of(&device, mode);
        let ends = if to_device {
            Ends::HostToDevice {
                dev,
                copier: &copier,
            }
        } else {
            Ends::DeviceToHost {
                dev,
                copier: &copier,
            }
        };
        let r = run_feed(None, ends, Feed::streamed(chunks_total, rx), lease.pair()?);
        tracing::trace!(
            started_us,
            leased_us,
            done_us = queued.elapsed().as_micros() as u64,
            "pageable transfer through the pool"
        );
        r
    });
    for (g, _) in groups {
        if sent.refused {
            break;
        }
        sent.send(&tx, g.build());
    }
    drop(tx);
    tracing::trace!(
        copies = sent.copies,
        groups = sent.groups,
        first_us,
        built_us = built.elapsed().as_micros() as u64,
        "pageable copy list built"
    );
    let (mechanism, sms) = match &device_kernel {
        Some((k, sms)) if takes_kernel(k, mode, direction, bytes, sent.copies) => {
            (Mechanism::Kernel, *sms)
        }
        _ => (Mechanism::CopyEngine, 0),
    };
    let list = CopyList {
        copies: Vec::new(),
        fragments: request.fragments(),
        bytes,
    };
    let stats = TransferStats {
        copies: sent.copies,
        bounced: true,
        sms,
        ..TransferStats::of(&list, plan, mechanism)
    };
    Ok(Transfer::new(completion, stats, true))
}
