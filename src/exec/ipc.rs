//! Transfers between device memory here and a same-host peer's device memory mapped through
//! CUDA IPC. The peer's regions are translated into this process's mapping of its allocations
//! (`IpcImport`), and the transfer runs as device-to-device work of the CUDA executor (kvxfer's
//! kernel, or the copy engines for large pieces) on this context's device; the plan stays the
//! seed's NixlWrite / NixlReadFlipped. A write's notification goes to the peer through NIXL
//! once every byte is in place. Where IPC cannot take a transfer, `route` says why and NIXL
//! moves it.

use std::sync::Arc;

use super::cuda::{self, CudaExec};
use super::nixl::NixlExec;
use super::workers::Workers;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::memory::{IpcFallback, Memory, StorageKind};
use crate::options::TransferOptions;
use crate::plan::{Plan, Request, Strategy};
use crate::transfer::{Completion, Transfer};

/// How a transfer between local memory and a peer's layout is carried.
pub(crate) enum Route {
    /// The peer's layout as mapped here (a local device layout for this transfer's lifetime).
    Ipc(Layout),
    /// Through NIXL; between device memory on both sides, why IPC could not take it.
    Nixl(Option<IpcFallback>),
}

/// Whether `request` (a write to the peer when `write`, else a read) moves through CUDA IPC.
/// `Err` only where the peer's layout cannot be used at all (it revoked it).
pub(crate) fn route(request: &Request<'_>, write: bool) -> Result<Route> {
    let (local, remote) = if write {
        (request.src, request.dst)
    } else {
        (request.dst, request.src)
    };
    let device = |l: &Layout| l.storage_kind() == StorageKind::Device;
    if !(remote.is_remote() && device(remote) && device(local) && !local.is_remote()) {
        return Ok(Route::Nixl(None));
    }
    let Some(ipc) = remote.memory().ipc() else {
        return Ok(Route::Nixl(Some(IpcFallback::NotExported)));
    };
    let Some(guard) = remote.memory().begin_remote_use()? else {
        return Err(Error::Internal(
            "a peer layout without its use state".into(),
        ));
    };
    let (regions, dev) = match ipc.translate(remote.memory().regions())? {
        Ok(r) => r,
        Err((why, text)) => {
            tracing::debug!(reason = ?why, "a same-host device transfer goes through NIXL: {text}");
            return Ok(Route::Nixl(Some(why)));
        }
    };
    // The mapping lives in the importing context's device (the import mapped it there); the
    // local layout must be there too, or on a device it reaches, which the CUDA executor checks.
    let memory = Memory::ipc_mapped(&dev, regions, guard);
    let mapped = Layout::new(*remote.config(), memory, remote.context_id())?;
    Ok(Route::Ipc(mapped))
}

/// Runs `request` with the peer's side replaced by `mapped` (from `route`) on the CUDA
/// executor; with `options.notify`, a worker waits for the bytes and then notifies the peer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit(
    request: &Request<'_>,
    mapped: &Layout,
    plan: Plan,
    write: bool,
    options: &TransferOptions,
    cuda: &CudaExec,
    nixl: &NixlExec,
    workers: &Workers,
) -> Result<Transfer> {
    let remote = if write { request.dst } else { request.src };
    let peer_agent = remote
        .peer()
        .ok_or_else(|| Error::Internal("an IPC transfer without a peer".into()))?
        .to_string();
    let on_device = Request {
        src: if write { request.src } else { mapped },
        dst: if write { mapped } else { request.dst },
        ..request.clone()
    };
    let device_options = TransferOptions {
        notify: None,
        ..options.clone()
    };
    let inner = cuda::submit(
        cuda,
        &on_device,
        plan,
        Strategy::CudaAsyncD2D,
        &device_options,
    )?
    .by_ipc();
    let Some(msg) = options.notify.clone() else {
        return Ok(inner);
    };
    // The notification must not reach the peer before the bytes: a worker sends it once the
    // device work completed.
    let completion = Completion::new(1);
    let stats = inner.stats();
    let layers = request.layers.clone();
    let agent = nixl.agent.clone();
    let use_state = Arc::clone(remote.memory());
    workers.spawn_part(completion.clone(), None, use_state, move || {
        inner.wait(None)?;
        agent.send(&peer_agent, &msg)
    });
    Ok(Transfer::new(completion, stats, true).with_layers(layers))
}
