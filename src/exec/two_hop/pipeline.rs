//! The two-hop pipeline: chunks of at most CHUNK bytes alternate between the two buffers of a
//! pair, so the first hop of chunk k+1 overlaps the second hop of chunk k.

use super::CHUNK;
use crate::error::{Error, Result};
use crate::plan::CopyOp;

/// Copies cut into chunks of at most CHUNK bytes each, in one allocation: at 64k fragments a
/// vector per chunk, grown copy by copy, cost a noticeable part of a transfer's start.
pub(super) struct Chunks {
    copies: Vec<CopyOp>,
    /// Chunk i is `copies[bounds[i]..bounds[i + 1]]`.
    bounds: Vec<usize>,
}

impl Chunks {
    pub(super) fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::ops::Index<usize> for Chunks {
    type Output = [CopyOp];

    fn index(&self, i: usize) -> &[CopyOp] {
        &self.copies[self.bounds[i]..self.bounds[i + 1]]
    }
}

/// A transfer's chunks, all at hand or arriving group by group from the thread that still
/// builds the copy list (a pageable transfer's first chunk moves while the rest is built).
pub(super) struct Feed {
    /// Groups received so far, each with the index of its first chunk.
    have: Vec<(usize, Chunks)>,
    /// Chunks of every group, received or not.
    total: usize,
    rx: Option<crossbeam_channel::Receiver<Chunks>>,
}

impl Feed {
    pub(super) fn ready(chunks: Chunks) -> Self {
        Self {
            total: chunks.len(),
            have: vec![(0, chunks)],
            rx: None,
        }
    }

    /// `total` chunks, in groups from `rx`.
    pub(super) fn streamed(total: usize, rx: crossbeam_channel::Receiver<Chunks>) -> Self {
        Self {
            have: Vec::new(),
            total,
            rx: Some(rx),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.total
    }

    fn received(&self) -> usize {
        self.have.last().map_or(0, |(at, c)| at + c.len())
    }

    /// Keeps a group that arrived, after the ones before it.
    fn take(&mut self, group: Chunks) {
        let at = self.received();
        self.have.push((at, group));
    }

    /// Waits for the group that holds chunk `i`.
    pub(super) fn ensure(&mut self, i: usize) -> Result<()> {
        while self.received() <= i && i < self.total {
            let group = self
                .rx
                .as_ref()
                .and_then(|rx| rx.recv().ok())
                .ok_or_else(|| Error::Internal("the copy list ended before its chunks".into()))?;
            self.take(group);
        }
        Ok(())
    }

    /// Whether chunk `i` is at hand, taking the groups that arrived meanwhile, never waiting.
    pub(super) fn try_ensure(&mut self, i: usize) -> bool {
        while self.received() <= i && i < self.total {
            let Some(group) = self.rx.as_ref().and_then(|rx| rx.try_recv().ok()) else {
                return false;
            };
            self.take(group);
        }
        i < self.total
    }

    /// Chunk `i`, once `ensure(i)` returned.
    pub(super) fn get(&self, i: usize) -> Result<&[CopyOp]> {
        let g = self.have.partition_point(|(at, _)| *at <= i);
        match g.checked_sub(1).map(|g| &self.have[g]) {
            Some((at, c)) if i - at < c.len() => Ok(&c[i - at]),
            _ => Err(Error::Internal(format!(
                "chunk {i} asked before it arrived"
            ))),
        }
    }
}

/// Cuts (src offset, dst offset, len) copies into chunks of at most CHUNK bytes each.
pub(super) fn chunks(copies: &[CopyOp]) -> Chunks {
    chunks_of(copies, CHUNK)
}

/// As `chunks`, with chunks of at most `size` (at most CHUNK) bytes.
pub(super) fn chunks_of(copies: &[CopyOp], size: u64) -> Chunks {
    let size = size.clamp(1, CHUNK);
    let bytes: u64 = copies.iter().map(|c| c.len).sum();
    let n = usize::try_from(bytes.div_ceil(size)).unwrap_or(usize::MAX);
    // A chunk boundary splits at most one copy in two.
    let mut out = Chunks {
        copies: Vec::with_capacity(copies.len().saturating_add(n)),
        bounds: Vec::with_capacity(n.saturating_add(1).min(1 << 20)),
    };
    out.bounds.push(0);
    let mut room = size;
    for &c in copies {
        let mut c = c;
        while c.len > 0 {
            if room == 0 {
                out.bounds.push(out.copies.len());
                room = size;
            }
            let n = c.len.min(room);
            out.copies.push(CopyOp { len: n, ..c });
            c = CopyOp {
                src: c.src + n,
                dst: c.dst + n,
                len: c.len - n,
            };
            room -= n;
        }
    }
    if out.copies.len() > *out.bounds.last().unwrap_or(&0) {
        out.bounds.push(out.copies.len());
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    /// Empty buffer i before filling the other one (the fill is the CUDA hop).
    DrainFirst,
    /// Fill the other buffer before emptying buffer i (the drain is the CUDA hop).
    FillFirst,
}

/// Runs `n` chunks through the two buffers: `first(i)` fills buffer `i % 2` with chunk i,
/// `second(i)` empties it. Everything started is finished before this returns, also on an
/// error, because the buffers go back to the pool.
pub(super) fn pipeline<H>(
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
    fn a_streamed_feed_hands_out_each_groups_chunks_in_order() {
        let op = |i: u64| CopyOp {
            src: i << 30,
            dst: i << 40,
            len: CHUNK,
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        // Groups of 2, 1 and 3 chunks.
        let groups = [vec![op(0), op(1)], vec![op(2)], vec![op(3), op(4), op(5)]];
        let mut feed = Feed::streamed(6, rx);
        assert!(feed.get(0).is_err());
        for g in &groups[..2] {
            tx.send(chunks(g)).unwrap();
        }
        feed.ensure(2).unwrap();
        assert_eq!(feed.get(2).unwrap(), [op(2)]);
        assert!(feed.get(3).is_err());
        assert!(!feed.try_ensure(3), "the third group has not been sent");
        tx.send(chunks(&groups[2])).unwrap();
        drop(tx);
        assert!(feed.try_ensure(5) && !feed.try_ensure(6));
        for i in 0..6 {
            feed.ensure(i).unwrap();
            assert_eq!(feed.get(i).unwrap(), [op(i as u64)]);
        }
        // Past the end: nothing to wait for, nothing to hand out.
        feed.ensure(6).unwrap();
        assert!(feed.get(6).is_err());
        // A sender gone before every chunk came is an error, not a hang.
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(chunks(&groups[0])).unwrap();
        drop(tx);
        let mut short = Feed::streamed(3, rx);
        short.ensure(1).unwrap();
        assert!(short.ensure(2).is_err());
        let ready = Feed::ready(chunks(&groups[2]));
        assert_eq!((ready.len(), ready.get(1).unwrap()), (3, &[op(4)][..]));
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
            [CopyOp {
                src: 0,
                dst: 1 << 40,
                len: CHUNK
            }]
        );
        assert_eq!(
            c[1],
            [
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
