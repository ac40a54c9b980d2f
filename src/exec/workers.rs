//! The context's worker threads, which are its progress engine for host copies: jobs arrive on
//! a channel, a worker blocks on it (no polling), runs each job to the end and reports to the
//! transfer's completion, which wakes its waiters. Dropping the pool finishes the queued jobs,
//! then joins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};

use super::memcpy;
use crate::cuda::StreamGate;
use crate::error::{Error, Result};
use crate::plan::CopyOp;
use crate::transfer::Completion;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug)]
pub(crate) struct Workers {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub(crate) fn new(count: usize, name: &str) -> Result<Self> {
        let (tx, rx) = unbounded::<Job>();
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let rx = rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .map_err(|e| Error::OutOfMemory(format!("cannot start worker thread: {e}")))?;
            threads.push(handle);
        }
        Ok(Self {
            tx: Some(tx),
            threads,
        })
    }

    pub(crate) fn count(&self) -> usize {
        self.threads.len()
    }

    /// A handle that queues jobs from inside a job (a two-hop transfer asking idle workers to
    /// help with its host copies). Held only while that job runs, so it never keeps the pool
    /// from shutting down.
    pub(crate) fn spawner(&self) -> Option<Spawner> {
        self.tx.clone().map(|tx| Spawner {
            tx,
            threads: self.threads.len(),
        })
    }

    /// Queues `job` as one part of `completion`. It starts once `gate` passed; its result, or
    /// an internal error if it panics, is the part's outcome; `keep` (the memory it reads and
    /// writes) is released only after it ran, so freeing a layout cannot release memory under
    /// it.
    pub(crate) fn spawn_part<K: Send + 'static>(
        &self,
        completion: Arc<Completion>,
        gate: Option<Arc<StreamGate>>,
        keep: K,
        job: impl FnOnce() -> Result<()> + Send + 'static,
    ) {
        let run = move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Some(g) = &gate {
                    g.wait()?;
                }
                job()
            }))
            .unwrap_or_else(|_| Err(Error::Internal("a worker job panicked".into())));
            drop((keep, gate));
            completion.part_done(result);
        };
        if let Some(tx) = &self.tx {
            // Sending only fails once every receiver is gone, which happens after drop.
            let _ = tx.send(Box::new(run));
        }
    }
}

/// Queues jobs on the pool from inside one of its jobs.
#[derive(Clone)]
pub(crate) struct Spawner {
    tx: Sender<Job>,
    threads: usize,
}

impl Spawner {
    fn spawn(&self, job: Job) {
        let _ = self.tx.send(job);
    }

    /// Starts copying `copies` (host memory on both sides) on whichever workers are idle: the
    /// list is cut into pieces that every participant takes in turn. The caller does other
    /// work meanwhile and joins in with `PendingCopy::finish` (also run when the handle is
    /// dropped), which returns once every piece is copied, so a helper that never gets to run
    /// (every worker busy) only means the caller does more itself, and nothing waits for a
    /// worker to become free. The list is shared as it is, cut at byte offsets
    /// (`memcpy::cuts`), not copied into pieces.
    ///
    /// # Safety
    /// As `memcpy::copy_all`: valid, non-overlapping ranges, untouched by others until the
    /// returned handle is finished or dropped.
    pub(crate) unsafe fn begin(&self, copies: Vec<CopyOp>) -> PendingCopy {
        let begun = std::time::Instant::now();
        let total: u64 = copies.iter().map(|c| c.len).sum();
        let streaming = total >= memcpy::STREAMING_MIN_BYTES;
        // Pieces of at least PIECE bytes, up to four per thread so that helpers that start
        // late still find work. Pieces of 64 KiB to 1 MiB, 1 to 8 per thread, and streaming
        // stores on or off moved 4 and 16 KiB fragments within the runs' noise
        // (docs/BENCHMARKS.md, "Pageable host memory through the bounce pool").
        const PIECE: u64 = 256 << 10;
        let n = (total / PIECE).clamp(1, 4 * self.threads as u64) as usize;
        let cuts = memcpy::cuts(&copies, total, n);
        let shared = Arc::new(Shared {
            copies,
            cuts,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            finished: (Mutex::new(()), Condvar::new()),
            streaming,
        });
        for _ in 1..shared.pieces().min(self.threads) {
            let s = shared.clone();
            self.spawn(Box::new(move || {
                s.work();
            }));
        }
        PendingCopy {
            shared: Some(shared),
            total,
            started: std::time::Instant::now(),
            begun,
        }
    }
}

/// A shared copy that helpers may have started: finished by the caller (`finish`, or drop).
pub(crate) struct PendingCopy {
    shared: Option<Arc<Shared>>,
    total: u64,
    /// When the helpers had been asked; `begun`: when `begin` was called. Between the two, the
    /// list was cut into pieces and the helpers woken (in the trace as `asking_us`: 56-260 µs
    /// for 32 MiB of 4 KiB pieces on the H200 machines while each piece was a copied list).
    started: std::time::Instant,
    begun: std::time::Instant,
}

impl PendingCopy {
    /// Copies what no helper took yet on this thread, then waits for the helpers' pieces.
    pub(crate) fn finish(mut self) {
        self.join();
    }

    fn join(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let joined = self.started.elapsed();
        let mine = shared.work();
        let (lock, cv) = &shared.finished;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while shared.done.load(Ordering::Acquire) < shared.pieces() {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        tracing::trace!(
            bytes = self.total,
            pieces = shared.pieces(),
            by_caller = mine,
            asking_us = (self.started - self.begun).as_micros() as u64,
            joined_us = joined.as_micros() as u64,
            total_us = self.started.elapsed().as_micros() as u64,
            "shared host copy"
        );
    }
}

impl Drop for PendingCopy {
    fn drop(&mut self) {
        // The ranges may be released after the handle: every piece is copied first.
        self.join();
    }
}

/// The pieces of one shared copy and how far it got.
struct Shared {
    copies: Vec<CopyOp>,
    /// Piece k is the bytes between `cuts[k]` and `cuts[k + 1]`.
    cuts: Vec<memcpy::Cut>,
    next: AtomicUsize,
    done: AtomicUsize,
    finished: (Mutex<()>, Condvar),
    streaming: bool,
}

impl Shared {
    fn pieces(&self) -> usize {
        self.cuts.len() - 1
    }

    /// Takes pieces until none is left; returns how many it copied.
    fn work(&self) -> usize {
        let mut n = 0;
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.pieces() {
                return n;
            }
            n += 1;
            // SAFETY: the caller of `Spawner::begin` vouched for every range and waits until
            // every piece taken here is done.
            unsafe {
                memcpy::copy_span(&self.copies, self.cuts[i], self.cuts[i + 1], self.streaming)
            };
            if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.pieces() {
                let (lock, cv) = &self.finished;
                let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
                cv.notify_all();
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of `len` bytes with a pattern, a zeroed destination, and copies of `piece`
    /// bytes that reverse the pieces' order.
    fn setup(len: usize, piece: usize) -> (Vec<u8>, Vec<u8>, Vec<CopyOp>) {
        let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; len];
        let to = dst.as_mut_ptr() as u64;
        let n = len / piece;
        let copies = (0..n)
            .map(|i| CopyOp {
                src: src.as_ptr() as u64 + (i * piece) as u64,
                dst: to + ((n - 1 - i) * piece) as u64,
                len: piece as u64,
            })
            .collect();
        (src, dst, copies)
    }

    fn reversed(src: &[u8], piece: usize) -> Vec<u8> {
        src.chunks(piece).rev().flatten().copied().collect()
    }

    #[test]
    fn a_begun_copy_is_complete_when_finished_or_dropped() {
        let workers = Workers::new(3, "kvx-test").unwrap();
        let spawner = workers.spawner().unwrap();
        for finish in [true, false] {
            let (src, dst, copies) = setup(4 << 20, 4096);
            // SAFETY: src and dst are live, disjoint vectors; dst is only read after the
            // pending copy is finished or dropped.
            let pending = unsafe { spawner.begin(copies) };
            if finish {
                pending.finish();
            } else {
                drop(pending);
            }
            assert_eq!(dst, reversed(&src, 4096), "finish: {finish}");
        }
    }

    #[test]
    fn a_copy_completes_on_the_caller_when_no_worker_is_free() {
        let workers = Workers::new(1, "kvx-test").unwrap();
        let spawner = workers.spawner().unwrap();
        // The only worker is busy until the copy is done: the caller copies every piece.
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        spawner.spawn(Box::new(move || {
            let _ = gate_rx.recv();
        }));
        let (src, dst, copies) = setup(1 << 20, 16384);
        // SAFETY: as above.
        unsafe { spawner.begin(copies) }.finish();
        assert_eq!(dst, reversed(&src, 16384));
        let _ = gate_tx.send(());
    }
}
