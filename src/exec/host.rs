//! The host executor: memcpy between host kinds, cut into equal shares over the context's
//! worker threads.

use std::sync::Arc;

use super::memcpy;
use super::workers::Workers;
use crate::cuda::StreamGate;
use crate::layout::heads::Piece;
use crate::options::{Mechanism, TransferStats};
use crate::plan::{Plan, Request};
use crate::transfer::{Completion, Transfer};

/// Starts `request` on `workers`. `gate`: start after the work queued on a caller's stream.
pub(crate) fn submit(
    workers: &Workers,
    request: &Request<'_>,
    plan: Plan,
    gate: Option<Arc<StreamGate>>,
    cuda_context: bool,
) -> Transfer {
    if let Some(pieces) = request.transform() {
        return submit_transform(workers, request, plan, gate, cuda_context, pieces);
    }
    let list = request.build();
    let shares = memcpy::split(&list.copies, workers.count());
    let stats = TransferStats::of(&list, plan, Mechanism::Memcpy);
    let streaming = list.bytes >= memcpy::STREAMING_MIN_BYTES;
    let completion = Completion::new(shares.len());
    for share in shares {
        let keep = (request.src.memory().clone(), request.dst.memory().clone());
        workers.spawn_part(completion.clone(), gate.clone(), keep, move || {
            // SAFETY: the request was validated: every range lies in memory that `keep` holds
            // alive, and no destination overlaps a source or another destination.
            unsafe { memcpy::copy_all(&share, streaming) };
            Ok(())
        });
    }
    Transfer::new(completion, stats, cuda_context)
}

/// A head transform: the region pairs in equal shares, each worker applying the pieces to its
/// pairs (a list of one copy per piece cost a serial build and a second pass over 24 bytes per
/// 256-byte piece).
fn submit_transform(
    workers: &Workers,
    request: &Request<'_>,
    plan: Plan,
    gate: Option<Arc<StreamGate>>,
    cuda_context: bool,
    pieces: Vec<Piece>,
) -> Transfer {
    let pairs = request.region_pairs();
    let bytes = request.bytes_with(Some(&pieces));
    let stats = TransferStats {
        bytes,
        fragments: request.fragments(),
        copies: request.fragments() * pieces.len() as u64,
        ..TransferStats::of(&Default::default(), plan, Mechanism::Memcpy)
    };
    let streaming = bytes >= memcpy::STREAMING_MIN_BYTES;
    let parts = (workers.count() as u64)
        .min(bytes.div_ceil(memcpy::MIN_SHARE_BYTES))
        .max(1) as usize;
    let per = pairs.len().div_ceil(parts).max(1);
    let shares: Vec<Vec<(u64, u64)>> = pairs.chunks(per).map(<[_]>::to_vec).collect();
    let completion = Completion::new(shares.len());
    let pieces = Arc::new(pieces);
    for share in shares {
        let keep = (request.src.memory().clone(), request.dst.memory().clone());
        let pieces = pieces.clone();
        workers.spawn_part(completion.clone(), gate.clone(), keep, move || {
            // SAFETY: the request was validated: every piece of every pair lies in memory that
            // `keep` holds alive, and no destination overlaps a source or another destination.
            unsafe { memcpy::copy_pieces(&share, &pieces, streaming) };
            Ok(())
        });
    }
    Transfer::new(completion, stats, cuda_context)
}
