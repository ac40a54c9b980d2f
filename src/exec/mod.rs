//! Executors: how a validated request is carried out. `dispatch` is the one entry point: it
//! takes the plan and starts the executor that serves it: `host` (memcpy and blocking CUDA
//! copies on the worker threads), `cuda` (copy engines or the SM kernel on the device's
//! streams), `nixl` (disk and peers through the NIXL agent), `two_hop` (through the pinned
//! bounce pool). Executors run on the `Resources` the context lends them and never see the
//! context itself.

pub(crate) mod cuda;
mod host;
mod ipc;
pub(crate) mod memcpy;
pub(crate) mod nixl;
mod two_hop;
mod workers;

use std::sync::Arc;

use crate::error::{Error, Result, bail};
use crate::memory::StorageKind;
use crate::options::TransferOptions;
use crate::plan::{Plan, Request, Strategy};
use crate::transfer::Transfer;
use cuda::CudaExec;
use nixl::NixlExec;
use two_hop::BouncePool;
pub(crate) use workers::Workers;

/// What executors run on, owned by a context. Fields drop in order: queued host copies finish
/// before the devices they may touch go away, GPU work before the NIXL agent.
#[derive(Debug)]
pub(crate) struct Resources {
    pub(crate) workers: Workers,
    /// The context's CUDA device, or why it has none.
    pub(crate) cuda: std::result::Result<CudaExec, String>,
    /// Present when the context asked for NIXL backends.
    pub(crate) nixl: Option<NixlExec>,
    /// Pinned bounce buffers for two-hop plans, made on first use and reused.
    bounce: Arc<BouncePool>,
}

impl Resources {
    pub(crate) fn new(
        workers: Workers,
        cuda: std::result::Result<CudaExec, String>,
        nixl: Option<NixlExec>,
    ) -> Self {
        Self {
            workers,
            cuda,
            nixl,
            bounce: Arc::default(),
        }
    }

    /// Pinned bounce buffers the two-hop pool holds.
    pub(crate) fn bounce_buffers(&self) -> u64 {
        self.bounce.buffers()
    }

    /// The CUDA side, or `Unavailable` saying why there is none.
    pub(crate) fn cuda(&self) -> Result<&CudaExec> {
        self.cuda.as_ref().map_err(|why| {
            Error::Unavailable(format!("CUDA is not available in this context: {why}"))
        })
    }

    /// The NIXL agent, or `Unavailable` saying that `what` needs one.
    pub(crate) fn nixl(&self, what: &str) -> Result<&NixlExec> {
        self.nixl.as_ref().ok_or_else(|| {
            Error::Unavailable(format!(
                "{what} needs NIXL; this context was made with nixl_backends = 0"
            ))
        })
    }

    fn gate(&self, stream: Option<usize>) -> Result<Option<Arc<crate::cuda::StreamGate>>> {
        match stream {
            None => Ok(None),
            Some(_) => self.cuda()?.gate(stream),
        }
    }
}

/// A head transform between local memory and a peer moves through the bounce pool when its
/// pieces average less than this: one NIXL descriptor per piece is slow below it.
const STAGE_PIECES_BELOW: u64 = 16 << 10;

/// Whether `request` (a NIXL write when `write`, else a read) is a head transform between
/// local host or device memory and a peer's layout with small pieces
/// (`two_hop::submit_staged_peer`).
fn stages_through_bounce(request: &Request<'_>, write: bool) -> bool {
    let (local, remote) = if write {
        (request.src, request.dst)
    } else {
        (request.dst, request.src)
    };
    if !remote.is_remote()
        || !matches!(
            local.storage_kind(),
            StorageKind::System | StorageKind::Pinned | StorageKind::Device
        )
    {
        return false;
    }
    request.fragments() > 0
        && request.transform().is_some_and(|p| {
            let bytes: u64 = p.iter().map(|p| p.len).sum();
            bytes / (p.len() as u64).max(1) < STAGE_PIECES_BELOW
        })
}

/// Checks `request`'s block ids (its shape was validated), then starts the executor that serves
/// `plan`; returns before the bytes have moved. An error means nothing was queued. The CUDA
/// executor checks the ids itself, in the pass that writes the copy kernel's table.
pub(crate) fn dispatch(
    plan: Plan,
    request: &Request<'_>,
    options: &TransferOptions,
    res: &Resources,
) -> Result<Transfer> {
    if options.cuda_stream.is_some() {
        res.cuda()?;
    }
    if options.notify.is_some()
        && !(request.dst.is_remote() && plan == Plan::Direct(Strategy::NixlWrite))
    {
        bail!(
            InvalidArgument,
            "notify_msg applies only to writes to a remote peer; this transfer is not one"
        );
    }
    if options
        .notify
        .as_deref()
        .is_some_and(|m| m.starts_with(crate::nixl::CONTROL_PREFIX))
    {
        bail!(
            InvalidArgument,
            "notify_msg must not begin with kvxfer's control prefix (\\0kvxfer-control\\0)"
        );
    }
    let has_cuda = res.cuda.is_ok();
    if !matches!(
        plan,
        Plan::Direct(Strategy::CudaAsyncH2D | Strategy::CudaAsyncD2H | Strategy::CudaAsyncD2D)
    ) {
        request.validate_ids(None)?;
    }
    match plan {
        Plan::Direct(Strategy::Memcpy) => {
            let gate = res.gate(options.cuda_stream)?;
            Ok(host::submit(&res.workers, request, plan, gate, has_cuda))
        }
        Plan::Direct(
            s @ (Strategy::CudaAsyncH2D | Strategy::CudaAsyncD2H | Strategy::CudaAsyncD2D),
        ) => cuda::submit(res.cuda()?, request, plan, s, options),
        // Pageable host memory moves through the pinned bounce pool: the plan stays the seed's
        // blocking strategy, the pool is how kvxfer carries it out.
        Plan::Direct(Strategy::CudaBlockingH2D | Strategy::CudaBlockingD2H) => {
            let gate = res.gate(options.cuda_stream)?;
            let cuda = res.cuda()?;
            let mode = options.copy_mode;
            two_hop::submit_pageable(request, plan, cuda, &res.workers, &res.bounce, gate, mode)
        }
        Plan::TwoHop {
            first: Strategy::NixlReadFlipped | Strategy::CudaAsyncD2H,
            second: Strategy::NixlWrite | Strategy::CudaAsyncH2D,
            bounce: StorageKind::Pinned,
        } => {
            let nixl = res.nixl("disk transfers")?;
            let gate = res.gate(options.cuda_stream)?;
            let cuda = res.cuda.as_ref().ok();
            two_hop::submit(request, plan, nixl, cuda, &res.workers, &res.bounce, gate)
        }
        // NixlRead is the GDS plan disk -> device: like NixlReadFlipped, the local side (the
        // device) is the destination and reads from the file.
        Plan::Direct(
            s @ (Strategy::NixlWrite | Strategy::NixlReadFlipped | Strategy::NixlRead),
        ) => {
            let nixl = res.nixl("disk and peer transfers")?;
            let write = s == Strategy::NixlWrite;
            // Every path below starts after the work queued on a caller's stream (the IPC path
            // through the CUDA executor's own gate).
            let gate = || res.gate(options.cuda_stream);
            // Device memory of a same-host peer: mapped through CUDA IPC where it can be.
            let ipc_fallback = match s {
                Strategy::NixlRead => None,
                _ => match ipc::route(request, write)? {
                    ipc::Route::Ipc(mapped) => {
                        let (cuda, workers) = (res.cuda()?, &res.workers);
                        return ipc::submit(
                            request, &mapped, plan, write, options, cuda, nixl, workers,
                        );
                    }
                    ipc::Route::Nixl(why) => why,
                },
            };
            // Small pieces to and from a peer with a landing arena (host memory on both sides,
            // or device memory on both sides that IPC does not take): gathered, moved in large
            // chunks, scattered on the other side.
            let aggregated = match s {
                Strategy::NixlRead => None,
                _ => two_hop::aggregate::applies(request, write),
            };
            if let Some(list) = aggregated {
                let (workers, bounce) = (&res.workers, &res.bounce);
                let notify = options.notify.as_deref();
                return two_hop::aggregate::submit(
                    request,
                    list,
                    plan,
                    write,
                    nixl,
                    workers,
                    bounce,
                    notify,
                    gate()?,
                    has_cuda,
                )
                .map(|t| t.with_ipc_fallback(ipc_fallback));
            }
            if stages_through_bounce(request, write) {
                let cuda = res.cuda.as_ref().ok();
                return two_hop::submit_staged_peer(
                    request,
                    plan,
                    nixl,
                    cuda,
                    &res.workers,
                    &res.bounce,
                    write,
                    options.notify.as_deref(),
                    gate()?,
                )
                .map(|t| t.with_ipc_fallback(ipc_fallback));
            }
            nixl::submit(
                nixl,
                request,
                plan,
                write,
                options.notify.as_deref(),
                has_cuda,
                gate()?,
            )
            .map(|t| t.with_ipc_fallback(ipc_fallback))
        }
        Plan::Direct(s) => bail!(
            Unavailable,
            "strategy {} ({} -> {}) is not available in this version of kvxfer",
            s.name(),
            request.src.storage_kind(),
            request.dst.storage_kind()
        ),
        Plan::TwoHop { .. } => bail!(
            Unavailable,
            "two-hop plan {plan} is not available in this version of kvxfer"
        ),
    }
}
