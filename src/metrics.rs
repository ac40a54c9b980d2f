//! A context's cumulative counters: lock-free cells updated on submit and on failure, read as
//! a `ContextStats` snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::options::{ContextStats, Counter};

#[derive(Debug, Default)]
struct Cells {
    transfers: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

impl Cells {
    fn get(&self) -> Counter {
        Counter {
            transfers: self.transfers.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// Updated by the context (transfers) and the peer control (exports, imports, revocations).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    by_mechanism: [Cells; 5],
    by_strategy: [Cells; 11],
    bounce_transfers: AtomicU64,
    bounce_bytes: AtomicU64,
    pub(crate) peers_imported: AtomicU64,
    pub(crate) layouts_exported: AtomicU64,
    pub(crate) revocations: AtomicU64,
    pub(crate) importers_lost: AtomicU64,
}

impl Counters {
    /// A transfer of `bytes` was submitted; `bounce`: through the pinned bounce pool.
    pub(crate) fn submitted(&self, mechanism: usize, strategy: usize, bytes: u64, bounce: bool) {
        for c in [&self.by_mechanism[mechanism], &self.by_strategy[strategy]] {
            c.transfers.fetch_add(1, Relaxed);
            c.bytes.fetch_add(bytes, Relaxed);
        }
        if bounce {
            self.bounce_transfers.fetch_add(1, Relaxed);
            self.bounce_bytes.fetch_add(bytes, Relaxed);
        }
    }

    /// A submitted transfer failed.
    pub(crate) fn failed(&self, mechanism: usize, strategy: usize) {
        self.by_mechanism[mechanism].errors.fetch_add(1, Relaxed);
        self.by_strategy[strategy].errors.fetch_add(1, Relaxed);
    }

    /// A snapshot; `bounce_buffers` is the pool's own count.
    pub(crate) fn snapshot(&self, bounce_buffers: u64) -> ContextStats {
        ContextStats {
            by_mechanism: std::array::from_fn(|i| self.by_mechanism[i].get()),
            by_strategy: std::array::from_fn(|i| self.by_strategy[i].get()),
            bounce_transfers: self.bounce_transfers.load(Relaxed),
            bounce_bytes: self.bounce_bytes.load(Relaxed),
            bounce_buffers,
            peers_imported: self.peers_imported.load(Relaxed),
            layouts_exported: self.layouts_exported.load(Relaxed),
            revocations: self.revocations.load(Relaxed),
            importers_lost: self.importers_lost.load(Relaxed),
        }
    }
}
