//! The progress engine for GPU work: one thread per direction stream. Events on one stream
//! complete in order, so each thread watches them first-in first-out without delaying
//! transfers on the other streams. It looks at a transfer's end event between sleeps, first
//! until shortly before the device's pace says the transfer ends, then in steps that grow
//! with its age (`next_look`); nothing spins, and with nothing in flight the thread blocks on
//! its queue. It does not sleep on a blocking-sync event: recording one after each transfer
//! made a submit ~2 µs longer and doubled the tail of small transfers (one 4 KiB block, submit
//! to wait, p99 29.6-34.9 µs against 17.7-23.1 without; session 19, device runs 4-6), and such
//! events were seen complete 30-60 µs late in some processes (session 18, device run 7).
//! A waiter watches the end itself (`Transfer::wait`), so this thread's pace only bounds how
//! late a transfer nobody waits on is reported and its memory released.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, unbounded};
use cudarc::driver::sys::{self, CUevent};

use crate::cuda::{CudaDevice, Direction, Route, Signals, StreamGate, TableBuffer, check};
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::transfer::Completion;

/// The shortest sleep between two looks at an event (the kernel's timer slack adds ~50 µs).
const LOOK_MIN: Duration = Duration::from_micros(20);
/// The longest: how late a transfer nobody waits on may be reported, at most.
const LOOK_MAX: Duration = Duration::from_micros(200);
/// A sleep toward a predicted end is aimed this much before it: sleeps overshoot (57-98 µs
/// on the H200 machines, `transfer.rs`, WAKE_LATE).
const LOOK_EARLY: Duration = Duration::from_micros(100);

/// What a transfer holds until its last copy finished.
pub(crate) struct Pending {
    /// Recorded after the transfer's last copy (`CudaDevice::record_end`, a watch event):
    /// looked at here, queried by waiters, waited on by callers' streams.
    pub(crate) end: CUevent,
    /// One watch event per layer, in order, for copy-engine transfers that complete layer by
    /// layer.
    pub(crate) layer_events: Vec<CUevent>,
    /// How long after its submit the transfer should start (behind the work queued before it
    /// on its stream, `Backlog::queue`) and end (that and `Pace::due`), when known.
    pub(crate) starts: Duration,
    pub(crate) due: Option<Duration>,
    /// It may have waited for other work first (a caller's stream, work queued before it):
    /// its age teaches the pace nothing.
    pub(crate) waited: bool,
    /// Its number on its stream (`Backlog::queue`), marked seen once it completed.
    pub(crate) number: u64,
    /// The kernel's per-layer counters (waited on only when someone asks: `Transfer`).
    pub(crate) signals: Option<Signals>,
    /// Bytes the transfer moves and its route, for the device's pace.
    pub(crate) bytes: u64,
    pub(crate) route: Route,
    pub(crate) completion: Arc<Completion>,
    pub(crate) table: Option<TableBuffer>,
    pub(crate) memory: Vec<Arc<Memory>>,
    pub(crate) gate: Option<Arc<StreamGate>>,
}

// SAFETY: the event handles are usable from any thread with the context bound; the rest is
// Send.
unsafe impl Send for Pending {}

/// How an event was seen complete: its transfer's age at the last look that found it pending
/// (zero if the first look found it complete) and at the look that found it done.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sighting {
    pending: Duration,
    done: Duration,
}

impl Sighting {
    /// What the pace may learn from it, for a transfer that was `due` then: the age at the last
    /// look that found the event pending, which the transfer certainly took, when the look after
    /// it came within an eighth of the transfer's age; else the age at which it was found done,
    /// only where that is sooner than it was due. Both err fast or are the truth, so waiters
    /// watch early and see the end themselves (then teach its exact time). Taught the age at
    /// which it was found done, which can be a look's step late, the pace erred slow: waiters
    /// slept past the end, each sighting later than the one before (session 19, device run 2:
    /// from submit to completion 0.78-0.89 of one large copy, against 0.91-0.94 in device time).
    /// Taught any pending age, it learnt that 1 GiB moves in ~60 µs from a look when the engine
    /// took a transfer (~60 µs after its submit) and the next, after a sleep toward the due
    /// time, that found it done: waiters then gave up watching before the end, and each of the
    /// next ten transfers was reported ~70 µs late (session 20, device run 3: rows at
    /// 0.79-0.85 of one large copy).
    fn teaches(self, due: Option<Duration>) -> Option<Duration> {
        let tight = self.done.saturating_sub(self.pending) <= self.done / 8;
        if !self.pending.is_zero() && tight {
            Some(self.pending)
        } else if due.is_none_or(|d| self.done < d) {
            Some(self.done)
        } else {
            None
        }
    }
}

/// How long to sleep before the next look at an event of a transfer of age `age` due at
/// `due`: until LOOK_EARLY before it is due, then a sixteenth of its age, LOOK_MIN to
/// LOOK_MAX (a transfer twice as old as another is reported at most twice as late).
fn next_look(age: Duration, due: Option<Duration>) -> Duration {
    let step = (age / 16).clamp(LOOK_MIN, LOOK_MAX);
    match due.and_then(|d| d.checked_sub(LOOK_EARLY + age)) {
        Some(early) => early.max(step),
        None => step,
    }
}

/// Looks at `event` until it completed, sleeping between looks (`next_look`); `completion`
/// is its transfer's, `due` when that should end. The context is bound.
fn watch(
    event: CUevent,
    completion: &Completion,
    due: Option<Duration>,
    what: &str,
) -> Result<Sighting> {
    let mut pending = Duration::ZERO;
    loop {
        let age = completion.age();
        // SAFETY: a pooled event recorded for this transfer, recycled only after it completed.
        match unsafe { sys::cuEventQuery(event) } {
            sys::CUresult::CUDA_SUCCESS => return Ok(Sighting { pending, done: age }),
            sys::CUresult::CUDA_ERROR_NOT_READY => pending = age,
            e => {
                check(e, what)?;
                return Ok(Sighting { pending, done: age });
            }
        }
        std::thread::sleep(next_look(age, due));
    }
}

#[derive(Debug)]
pub(crate) struct Progress {
    lanes: Vec<Sender<Pending>>,
    threads: Vec<JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn new(dev: &Arc<CudaDevice>) -> Result<Self> {
        let mut lanes = Vec::new();
        let mut threads = Vec::new();
        for lane in 0..3 {
            let (tx, rx) = unbounded::<Pending>();
            let dev = dev.clone();
            let t = std::thread::Builder::new()
                .name(format!("kvx-progress-{lane}"))
                .spawn(move || {
                    let bound = dev.bind();
                    for p in rx {
                        // Layers first, in order: each wakes its waiters as it lands.
                        let mut layers_ok = true;
                        let n = p.layer_events.len() as u32;
                        for (i, &e) in p.layer_events.iter().enumerate() {
                            // A layer is due its share of the transfer's time.
                            let due = p.due.map(|d| {
                                p.starts + d.saturating_sub(p.starts) * (i as u32 + 1) / n.max(1)
                            });
                            let r = match &bound {
                                Ok(()) => watch(e, &p.completion, due, "layer").map(drop),
                                Err(e) => Err(e.clone()),
                            };
                            layers_ok &= r.is_ok();
                            if r.is_ok() {
                                p.completion.layer_done();
                            }
                        }
                        let seen = match &bound {
                            Ok(()) => watch(p.end, &p.completion, p.due, "transfer"),
                            Err(e) => Err(e.clone()),
                        };
                        tracing::trace!(
                            lane,
                            age_us = p.completion.age().as_micros() as u64,
                            "transfer's event passed (progress engine)"
                        );
                        if seen.is_ok() {
                            dev.backlog.seen(p.route.direction, p.number);
                        }
                        // One a waiter saw finish has taught the pace its exact time.
                        if let Some(took) = seen.as_ref().ok().and_then(|s| s.teaches(p.due))
                            && !p.completion.is_done()
                        {
                            dev.pace.learn(p.route, p.bytes, took, p.waited);
                        }
                        let r = seen.map(drop);
                        if let Some(s) = p.signals {
                            dev.recycle_signals(s, r.is_ok() && layers_ok);
                        }
                        // The memory goes before completion is reported, so a layout freed
                        // after a wait is released at once. Completed before the events go
                        // back to the pool: a waiter that finds the transfer still pending may
                        // query an event, and it must not be another transfer's yet.
                        drop(p.memory);
                        p.completion.part_done(r);
                        dev.recycle_watch_event(p.end);
                        for e in p.layer_events {
                            dev.recycle_watch_event(e);
                        }
                        if let Some(t) = p.table {
                            dev.recycle_table(t);
                        }
                        drop(p.gate);
                    }
                })
                .map_err(|e| Error::OutOfMemory(format!("cannot start progress thread: {e}")))?;
            lanes.push(tx);
            threads.push(t);
        }
        Ok(Self { lanes, threads })
    }

    pub(crate) fn push(&self, d: Direction, p: Pending) {
        // Sending only fails after drop, when no transfer can be submitted any more.
        let _ = self.lanes[d as usize].send(p);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.lanes.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn looks_are_aimed_early_at_the_due_time_then_grow_with_age() {
        // Due in 1 ms: one sleep to 100 µs before it.
        assert_eq!(next_look(us(0), Some(us(1000))), us(900));
        assert_eq!(next_look(us(600), Some(us(1000))), us(300));
        // Close to or past the due time, or with none: a sixteenth of the age, bounded.
        assert_eq!(next_look(us(960), Some(us(1000))), us(60));
        assert_eq!(next_look(us(0), None), LOOK_MIN);
        assert_eq!(next_look(us(1600), None), us(100));
        assert_eq!(next_look(us(1_000_000), Some(us(1000))), LOOK_MAX);
        // A due time sooner than the shortest step still waits that step.
        assert_eq!(next_look(us(0), Some(us(110))), LOOK_MIN);
    }

    #[test]
    fn the_pace_learns_a_close_lower_bound_or_a_sooner_end() {
        let seen = |pending, done| Sighting {
            pending: us(pending),
            done: us(done),
        };
        let due = Some(us(1000));
        // The last pending look, where the look after it came soon after.
        assert_eq!(seen(900, 960).teaches(due), Some(us(900)));
        assert_eq!(seen(875, 1000).teaches(due), Some(us(875)));
        // A look when the engine took the transfer, then one long after: the end, only where
        // it came sooner than due.
        assert_eq!(seen(60, 560).teaches(due), Some(us(560)));
        assert_eq!(seen(60, 1200).teaches(due), None);
        assert_eq!(seen(874, 1000).teaches(due), None);
        // Done at the first look: the same.
        assert_eq!(seen(0, 40).teaches(due), Some(us(40)));
        assert_eq!(seen(0, 1040).teaches(due), None);
        // Nothing learned yet: where it ended is better than nothing.
        assert_eq!(seen(60, 1200).teaches(None), Some(us(1200)));
    }
}
