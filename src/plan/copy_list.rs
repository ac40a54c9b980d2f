//! A transfer request, its validation, and the copy list it becomes: one (src, dst, len) per
//! (block pair, layer in range, outer), with contiguous neighbours coalesced.

use std::cell::RefCell;
use std::ops::Range;

use crate::error::{Result, bail};
use crate::layout::heads::{self, Piece};
use crate::layout::{Layout, LayoutKind};

/// Most (block, layer, outer) pieces one transfer may have (16k blocks × 64 layers × K/V is
/// 2M). The copy list is built in memory, so an absurd request is refused, not attempted.
pub(crate) const MAX_FRAGMENTS: u64 = 1 << 26;

/// One contiguous copy. Addresses are host or device addresses, or file offsets for disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

impl CopyOp {
    /// The same bytes seen from the other end: source and destination swapped. NIXL's flipped
    /// reads and a bounce buffer's fill describe a copy from its destination's side.
    pub fn flipped(self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            len: self.len,
        }
    }
}

/// The copies of one transfer, after coalescing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyList {
    pub copies: Vec<CopyOp>,
    /// Number of (block, layer, outer) pieces before coalescing.
    pub fragments: u64,
    pub bytes: u64,
}

/// Orders `copies` by destination address and merges neighbours that are then contiguous on
/// both sides. For a file as destination this turns scattered block ids into ascending offsets,
/// which the block layer can merge and a disk reads ahead; the order of copies within one
/// transfer is free because destinations never overlap (validated).
pub fn sort_by_dst(copies: &mut Vec<CopyOp>) {
    copies.sort_unstable_by_key(|c| c.dst);
    copies.dedup_by(|next, last| {
        let joins = last.src + last.len == next.src && last.dst + last.len == next.dst;
        if joins {
            last.len += next.len;
        }
        joins
    });
}

/// Moves `src_blocks[i]` of `src` to `dst_blocks[i]` of `dst`, for the layers in `layers`.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub src: &'a Layout,
    pub src_blocks: &'a [u64],
    pub dst: &'a Layout,
    pub dst_blocks: &'a [u64],
    pub layers: Range<u64>,
}

/// Resolves the options' layer range; `end == 0` means all layers, which then must be the same
/// number in both layouts.
pub fn resolve_layers(src: &Layout, dst: &Layout, begin: u64, end: u64) -> Result<Range<u64>> {
    let (ns, nd) = (src.config().num_layers, dst.config().num_layers);
    let end = if end == 0 {
        if ns != nd {
            bail!(
                InvalidArgument,
                "source has {ns} layers and destination {nd}: give an explicit layer range"
            );
        }
        ns
    } else {
        end
    };
    if begin >= end {
        bail!(
            InvalidArgument,
            "empty layer range [{begin}, {end}): layer_begin must be below layer_end"
        );
    }
    if end > ns.min(nd) {
        bail!(
            OutOfRange,
            "layer range [{begin}, {end}) does not lie in both layouts ({ns} and {nd} layers)"
        );
    }
    Ok(begin..end)
}

impl Request<'_> {
    /// Checks everything that could make the transfer wrong (a submit runs the two halves
    /// apart: `Context::submit`, `exec::dispatch`).
    #[cfg(test)]
    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_shape()?;
        self.validate_ids(None).map(drop)
    }

    /// The checks of `validate` but those of the block ids: equal list lengths, layouts that
    /// fit each other, the layer range, the request's size. `validate_ids` must follow before
    /// anything moves.
    pub(crate) fn validate_shape(&self) -> Result<()> {
        let (s, d) = (self.src.config(), self.dst.config());
        if self.src_blocks.len() != self.dst_blocks.len() {
            bail!(
                InvalidArgument,
                "{} source blocks but {} destination blocks",
                self.src_blocks.len(),
                self.dst_blocks.len()
            );
        }
        if s.outer_dim != d.outer_dim {
            bail!(
                InvalidArgument,
                "layouts differ in outer_dim ({} vs {})",
                s.outer_dim,
                d.outer_dim
            );
        }
        match (self.src.head_side(), self.dst.head_side()) {
            (Some(a), Some(b)) => heads::check(&a, &b, s.dtype_width, d.dtype_width)?,
            _ if self.src.region_len() != self.dst.region_len() => bail!(
                InvalidArgument,
                "layouts differ in region size ({} vs {} bytes per block, layer and outer){}",
                self.src.region_len(),
                self.dst.region_len(),
                if s.heads.is_opaque() != d.heads.is_opaque() {
                    "; only one of them describes its heads (num_heads), so no head transform \
                     applies"
                } else {
                    ""
                }
            ),
            _ => {}
        }
        if self.layers.start >= self.layers.end || self.layers.end > s.num_layers.min(d.num_layers)
        {
            bail!(
                OutOfRange,
                "layer range {:?} is not in both layouts",
                self.layers
            );
        }
        let fragments = (self.src_blocks.len() as u64)
            .checked_mul(self.layers.end - self.layers.start)
            .and_then(|n| n.checked_mul(s.outer_dim));
        match fragments {
            Some(n) if n <= MAX_FRAGMENTS => {}
            _ => bail!(
                InvalidArgument,
                "transfer has more than {MAX_FRAGMENTS} block x layer x outer pieces: split it"
            ),
        }
        Ok(())
    }

    /// The checks of the block ids, after `validate_shape`: every id in its layout, no
    /// destination block twice, no block both source and destination of one memory. Given
    /// `packed` (at least half as many words as pairs) and 16-bit ids on both sides, also
    /// writes the pairs there two to a word (`pack16`) in the same pass over the ids, and says
    /// so: a second read of the caller's ids costs what the check of them does when they come
    /// from memory (session 16).
    pub(crate) fn validate_ids(&self, packed: Option<&mut [u64]>) -> Result<bool> {
        let (s, d) = (self.src.config(), self.dst.config());
        let (sb, db) = (self.src_blocks, self.dst_blocks);
        let wrote =
            packed.is_some_and(|out| check_and_pack16(sb, s.num_blocks, db, d.num_blocks, out));
        // The common case at once; the checks below only run to name what is wrong.
        if !wrote && !pairs_valid(self.src_blocks, s.num_blocks, self.dst_blocks, d.num_blocks) {
            self.src.check_blocks(self.src_blocks, "src_blocks")?;
            self.dst.check_blocks(self.dst_blocks, "dst_blocks")?;
            if let Some((i, b)) = first_duplicate(self.dst_blocks, d.num_blocks) {
                bail!(
                    InvalidArgument,
                    "destination block {b} appears more than once (dst_blocks[{i}])"
                );
            }
        }
        if std::sync::Arc::ptr_eq(self.src.memory(), self.dst.memory()) {
            // Blocks of one layout never share bytes, so only equal ids can overlap.
            if let Some(b) = first_common(self.src_blocks, self.dst_blocks, d.num_blocks) {
                bail!(
                    InvalidArgument,
                    "block {b} is both a source and a destination in the same layout"
                );
            }
        } else if self.src.memory().may_alias(self.dst.memory()) {
            self.check_no_overlap()?;
        }
        Ok(wrote)
    }

    /// For two layouts over overlapping memory (wrapped twice): no source byte may be a
    /// destination byte.
    fn check_no_overlap(&self) -> Result<()> {
        let list = self.build();
        let mut dst: Vec<(u64, u64)> = list.copies.iter().map(|c| (c.dst, c.len)).collect();
        dst.sort_unstable();
        for c in &list.copies {
            let end = c.src + c.len;
            // Destinations do not overlap each other, so the last one starting before `end`
            // is the only candidate.
            let i = dst.partition_point(|&(start, _)| start < end);
            if i > 0 {
                let (start, len) = dst[i - 1];
                if start + len > c.src {
                    bail!(
                        InvalidArgument,
                        "source and destination overlap in memory at {:#x}",
                        c.src.max(start)
                    );
                }
            }
        }
        Ok(())
    }

    /// The copies inside one region pair of a head transform (both layouts describe their
    /// heads), or `None` when regions move whole.
    pub(crate) fn transform(&self) -> Option<Vec<Piece>> {
        let (a, b) = (self.src.head_side()?, self.dst.head_side()?);
        Some(heads::pieces(&a, &b))
    }

    /// The copy list of a validated request, walked in the order that keeps the destination
    /// contiguous so that neighbours coalesce; with a head transform, each region pair is cut
    /// into its pieces.
    pub fn build(&self) -> CopyList {
        let region = self.src.region_len();
        let n = self.fragments();
        let pieces = self.transform();
        let per_fragment = pieces.as_ref().map_or(1, |p| p.len() as u64).max(1);
        let bytes = self.bytes_with(pieces.as_deref());
        let mut list = CopyList {
            // One allocation instead of ~17 doublings, each copying the list so far (a fifth of
            // the build's time at 64k fragments). Coalescing can only shorten the list.
            copies: Vec::with_capacity(
                usize::try_from(n.saturating_mul(per_fragment))
                    .unwrap_or(usize::MAX)
                    .min(1 << 20),
            ),
            fragments: n,
            bytes,
        };
        match &pieces {
            None => self.walk(|src, dst| coalesce(&mut list.copies, src, dst, region)),
            Some(pieces) => self.walk(|src, dst| {
                for p in pieces {
                    coalesce(&mut list.copies, src + p.src, dst + p.dst, p.len);
                }
            }),
        }
        list
    }

    /// The request cut into runs of consecutive block pairs of at most `bytes` bytes each (one
    /// pair at least), in order, with the bytes each moves: each builds its own copy list, so
    /// that a pipelined executor starts on the first while the rest are still being built.
    pub(crate) fn groups(&self, bytes: u64) -> impl Iterator<Item = (Request<'_>, u64)> + '_ {
        let pairs = self.src_blocks.len();
        let per_pair = self
            .bytes_with(self.transform().as_deref())
            .checked_div(pairs as u64)
            .unwrap_or(0);
        let step = usize::try_from(bytes.checked_div(per_pair).unwrap_or(u64::MAX))
            .unwrap_or(usize::MAX)
            .max(1);
        (0..pairs).step_by(step).map(move |a| {
            let b = a.saturating_add(step).min(pairs);
            let group = Request {
                src_blocks: &self.src_blocks[a..b],
                dst_blocks: &self.dst_blocks[a..b],
                layers: self.layers.clone(),
                ..*self
            };
            (group, (b - a) as u64 * per_pair)
        })
    }

    /// The (source, destination) start of every region pair, in walk order, not merged: a
    /// head transform's executors apply its pieces to each.
    pub(crate) fn region_pairs(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::with_capacity(usize::try_from(self.fragments()).unwrap_or(0).min(1 << 24));
        self.walk(|s, d| v.push((s, d)));
        v
    }

    /// Bytes the request moves: whole regions, or the pieces of its head transform
    /// (`transform`, as `Request::transform` returned it).
    pub(crate) fn bytes_with(&self, transform: Option<&[Piece]>) -> u64 {
        let per = transform.map_or(self.src.region_len(), |p| p.iter().map(|p| p.len).sum());
        self.fragments() * per
    }

    /// (block, layer, outer) pieces of the request in the request's layer range.
    pub fn fragments(&self) -> u64 {
        self.src_blocks.len() as u64
            * (self.layers.end - self.layers.start)
            * self.src.config().outer_dim
    }

    /// Calls `push(src, dst)` for every fragment, in destination order.
    fn walk(&self, mut push: impl FnMut(u64, u64)) {
        let (s, d) = (self.src, self.dst);
        let outer = s.config().outer_dim;
        let mut one = |b: usize, l: u64, o: u64| {
            push(
                s.addr_unchecked(self.src_blocks[b], l, o),
                d.addr_unchecked(self.dst_blocks[b], l, o),
            );
        };
        let blocks = 0..self.src_blocks.len();
        match d.config().kind {
            LayoutKind::FullyContiguous => {
                for b in blocks {
                    for l in self.layers.clone() {
                        for o in 0..outer {
                            one(b, l, o);
                        }
                    }
                }
            }
            LayoutKind::LayerSeparateBlockFirst => {
                for l in self.layers.clone() {
                    for b in blocks.clone() {
                        for o in 0..outer {
                            one(b, l, o);
                        }
                    }
                }
            }
            LayoutKind::LayerSeparateOuterFirst => {
                for l in self.layers.clone() {
                    for o in 0..outer {
                        for b in blocks.clone() {
                            one(b, l, o);
                        }
                    }
                }
            }
        }
    }
}

/// Appends a `len`-byte copy, merged into the last one where both sides continue it.
fn coalesce(copies: &mut Vec<CopyOp>, src: u64, dst: u64, len: u64) {
    match copies.last_mut() {
        Some(last) if last.src + last.len == src && last.dst + last.len == dst => {
            last.len += len;
        }
        _ => copies.push(CopyOp { src, dst, len }),
    }
}

thread_local! {
    /// The bitmap `pairs_valid` marks destinations in, kept by each submitting thread (up to
    /// KEPT_BITMAP_WORDS) so that a submit neither allocates nor faults in fresh pages for it.
    static SEEN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// The byte marks `pairs_valid` uses for a small, dense id space (at most MARKED_BLOCKS).
    static MARKS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Id spaces up to this many blocks (32 KiB of marks), and at most four blocks per id listed,
/// are checked for repeats with a byte per block instead of a bit: stores alone and one count
/// instead of a read-modify-write per id. 4096 destinations among 4096 blocks (a 1 GiB
/// device-to-device transfer of 4 KiB pieces) took 2.7-3.3 µs instead of 4.4-4.6 on the build
/// machine, the same check in C++ 8.6-10.2 µs instead of 8.7-13.5 on the H200 machines' hosts
/// (session 16, device runs 7 and 12); over 64 KiB of marks the two are even (65536 blocks).
const MARKED_BLOCKS: u64 = 1 << 15;

/// Whether `ids`, each below `num_blocks` (checked by the caller), has no repeat: a byte per
/// block marked with stores alone, then one vectorised count of the marked bytes.
fn distinct_by_marks(ids: &[u64], num_blocks: u64, marks: &mut Vec<u8>) -> bool {
    marks.clear();
    marks.resize(num_blocks as usize, 0);
    for &b in ids {
        if let Some(m) = marks.get_mut(b as usize) {
            *m = 1;
        }
    }
    let distinct: usize = marks
        .chunks(255)
        .map(|c| c.iter().sum::<u8>() as usize)
        .sum();
    distinct == ids.len()
}

/// Whether every source id is below `src_blocks` and every destination id below `dst_blocks`
/// and none repeats, proven with two vectorised range checks and a bit per destination block
/// (a byte where the id space is small and dense: `distinct_by_marks`);
/// `false` also where the bitmap would be larger than the lists (the caller's separate checks
/// decide then). 65536 pairs took 0.33-0.42 ms to validate on the H200 machines' hosts, 6% of
/// a 256 MiB transfer beside an engine (session 14, device run 6): the duplicate search checked
/// the range a third time and marked a fresh 64 KB array. In one pass with the range checks
/// folded into the bitmap's loop: 0.20-0.27 ms there (device run 10); split again so that the
/// range checks vectorise, 68-71 µs instead of 74-77 on the build machine (best of 200).
fn pairs_valid(src: &[u64], src_blocks: u64, dst: &[u64], dst_blocks: u64) -> bool {
    if dst_blocks > (dst.len() as u64).saturating_mul(64)
        || !crate::layout::all_below(src, src_blocks)
        || !crate::layout::all_below(dst, dst_blocks)
    {
        return false;
    }
    if marks_fit(dst.len(), dst_blocks) {
        return MARKS.with_borrow_mut(|marks| distinct_by_marks(dst, dst_blocks, marks));
    }
    with_bitmap(dst_blocks, |seen| {
        // Repeats are or-ed together, so the loop has no branch to mispredict.
        dst.iter()
            .fold(0, |repeated, &d| repeated | mark_bit(seen, d))
            == 0
    })
}

/// Whether repeats among `len` destinations of `dst_blocks` blocks are looked for with a byte
/// per block (`distinct_by_marks`) rather than a bit.
fn marks_fit(len: usize, dst_blocks: u64) -> bool {
    dst_blocks <= MARKED_BLOCKS && dst_blocks <= (len as u64).saturating_mul(4)
}

/// Runs `f` on this thread's bitmap, cleared to `blocks` bits (one word at least). A bitmap
/// for a million blocks stays for the next submit; a larger one is released after.
fn with_bitmap<T>(blocks: u64, f: impl FnOnce(&mut [u64]) -> T) -> T {
    SEEN.with_borrow_mut(|seen| {
        seen.clear();
        seen.resize(blocks.div_ceil(64).max(1) as usize, 0);
        let r = f(seen);
        if seen.capacity() > KEPT_BITMAP_WORDS {
            *seen = Vec::new();
        }
        r
    })
}

/// Sets block `b`'s bit in `seen` (not empty) and returns it as it was: non-zero for a repeat.
/// An id beyond the bitmap marks its last word: callers have refused such ids, or do.
#[inline]
fn mark_bit(seen: &mut [u64], b: u64) -> u64 {
    let at = ((b / 64) as usize).min(seen.len().saturating_sub(1));
    let bit = 1u64 << (b % 64);
    let was = seen[at] & bit;
    seen[at] |= bit;
    was
}

/// Two (source, destination) pairs of 16-bit ids in one word, little-endian: the copy kernel's
/// table at two bytes per id (copy_blocks.cu's `block_id`).
#[inline]
pub(crate) const fn pack16(s0: u64, d0: u64, s1: u64, d1: u64) -> u64 {
    s0 | (d0 << 16) | (s1 << 32) | (d1 << 48)
}

/// `pairs_valid` for id spaces of at most 65536 blocks, writing the pairs into `out` (`pack16`,
/// at least `src.len().div_ceil(2)` words) in the same pass: each id is read once. False where
/// it cannot (wider ids, `out` too short) and as `pairs_valid` is (`out` then holds part of the
/// list).
fn check_and_pack16(
    src: &[u64],
    src_blocks: u64,
    dst: &[u64],
    dst_blocks: u64,
    out: &mut [u64],
) -> bool {
    if src.len() != dst.len()
        || src_blocks > 1 << 16
        || dst_blocks > 1 << 16
        || out.len() < src.len().div_ceil(2)
    {
        return false;
    }
    if marks_fit(dst.len(), dst_blocks) {
        return ranges_and_pack16::<false>(src, src_blocks, dst, dst_blocks, out, &mut [])
            && MARKS.with_borrow_mut(|marks| distinct_by_marks(dst, dst_blocks, marks));
    }
    with_bitmap(dst_blocks, |seen| {
        ranges_and_pack16::<true>(src, src_blocks, dst, dst_blocks, out, seen)
    })
}

/// Whether every id is in range (and, with MARK, no destination repeats in the bitmap `seen`),
/// writing the pairs into `out` on the way. Eight pairs at a time: their range checks and
/// packing in lanes the compiler vectorises, their destinations marked one by one. On the build
/// machine, 65536 pairs (best of 101): 83-86 µs with the ids in the cache against the separate
/// checks and pack's 88-89, and 86-98 from memory against their 119-131.
fn ranges_and_pack16<const MARK: bool>(
    src: &[u64],
    src_blocks: u64,
    dst: &[u64],
    dst_blocks: u64,
    out: &mut [u64],
    seen: &mut [u64],
) -> bool {
    // Lane l keeps its top bit while each id it saw was below its bound (`all_below`).
    const TOP: u64 = 1 << 63;
    let mut lanes = [TOP; 8];
    // Repeats are or-ed together, so the loop has no branch to mispredict.
    let mut repeated = 0u64;
    let (s8, d8) = (src.chunks_exact(8), dst.chunks_exact(8));
    let (s_rest, d_rest) = (s8.remainder(), d8.remainder());
    let full = src.len() / 8;
    for ((s, d), w) in s8.zip(d8).zip(out.chunks_exact_mut(4)) {
        // Fixed-size arrays, so that the lanes below compile to vector code without bounds
        // checks (with slices the pass ran a third slower).
        let (Ok(s), Ok(d), Ok(w)) = (
            <&[u64; 8]>::try_from(s),
            <&[u64; 8]>::try_from(d),
            <&mut [u64; 4]>::try_from(w),
        ) else {
            return false;
        };
        for i in 0..8 {
            lanes[i] &=
                (s[i].wrapping_sub(src_blocks) & !s[i]) & (d[i].wrapping_sub(dst_blocks) & !d[i]);
        }
        for i in 0..4 {
            w[i] = pack16(s[2 * i], d[2 * i], s[2 * i + 1], d[2 * i + 1]);
        }
        if MARK {
            // An id out of range is caught by the lanes.
            for &b in d {
                repeated |= mark_bit(seen, b);
            }
        }
    }
    let Some(tail) = out.get_mut(full * 4..src.len().div_ceil(2)) else {
        return false;
    };
    tail.fill(0);
    for (i, (&s, &d)) in s_rest.iter().zip(d_rest).enumerate() {
        if s >= src_blocks || d >= dst_blocks {
            return false;
        }
        tail[i / 2] |= pack16(s, d, 0, 0) << (32 * (i % 2));
        if MARK {
            repeated |= mark_bit(seen, d);
        }
    }
    lanes.iter().fold(TOP, |a, &l| a & l) & TOP != 0 && repeated == 0
}

/// The largest bitmap `pairs_valid` keeps between submits: 128 KiB, a million blocks.
const KEPT_BITMAP_WORDS: usize = 1 << 14;

/// A set of block ids: a bitmap when the id space is small next to the list, else sorting.
fn first_duplicate(ids: &[u64], num_blocks: u64) -> Option<(usize, u64)> {
    // A byte per id: independent stores, then one vectorised count, several times faster than
    // the bitmap's read-modify-write chain. Runs where `pairs_valid` could not decide (ids
    // sparse in a large space) or found something wrong, and for a layout moved onto itself;
    // only a failing list pays for locating the duplicate.
    if num_blocks <= (ids.len() as u64).saturating_mul(16)
        && crate::layout::all_below(ids, num_blocks)
        && distinct_by_marks(ids, num_blocks, &mut Vec::new())
    {
        return None;
    }
    if num_blocks <= (ids.len() as u64).saturating_mul(64).max(1 << 20) {
        let mut seen = vec![0u64; num_blocks.div_ceil(64) as usize];
        for (i, &b) in ids.iter().enumerate() {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if seen[w] & bit != 0 {
                return Some((i, b));
            }
            seen[w] |= bit;
        }
        None
    } else {
        let mut sorted: Vec<(u64, usize)> = ids.iter().enumerate().map(|(i, &b)| (b, i)).collect();
        sorted.sort_unstable();
        sorted
            .windows(2)
            .find(|w| w[0].0 == w[1].0)
            .map(|w| (w[0].1.max(w[1].1), w[0].0))
    }
}

fn first_common(a: &[u64], b: &[u64], num_blocks: u64) -> Option<u64> {
    let mut all = Vec::with_capacity(a.len() + b.len());
    // Ids within each list may repeat in `a` (one source to many destinations), so dedupe `a`.
    let mut a_sorted = a.to_vec();
    a_sorted.sort_unstable();
    a_sorted.dedup();
    all.extend_from_slice(&a_sorted);
    all.extend_from_slice(b);
    first_duplicate(&all, num_blocks).map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::layout::LayoutConfig;
    use crate::memory::{Memory, Region, StorageKind};

    fn cfg(kind: LayoutKind, blocks: u64) -> LayoutConfig {
        LayoutConfig {
            num_blocks: blocks,
            num_layers: 2,
            outer_dim: 2,
            page_size: 2,
            inner_dim: 4,
            dtype_width: 2,
            alignment: 1,
            kind,
            heads: Default::default(),
        }
    }

    /// A layout over fake addresses: nothing is dereferenced by planning.
    fn fake(kind: LayoutKind, blocks: u64, base: u64) -> Layout {
        let c = cfg(kind, blocks);
        let g = c.validate().unwrap();
        let regions = (0..g.allocations)
            .map(|i| Region {
                addr: base + i * 0x10_0000,
                len: g.allocation_len,
            })
            .collect();
        Layout::new(c, Memory::caller_owned(StorageKind::System, 0, regions), 1).unwrap()
    }

    fn req<'a>(s: &'a Layout, sb: &'a [u64], d: &'a Layout, db: &'a [u64]) -> Request<'a> {
        Request {
            src: s,
            src_blocks: sb,
            dst: d,
            dst_blocks: db,
            layers: 0..2,
        }
    }

    #[test]
    fn sort_by_dst_orders_and_merges_what_becomes_contiguous() {
        // FC -> FC with reversed ids: nothing coalesces in request order, all of it by offset.
        let s = fake(LayoutKind::FullyContiguous, 8, 0x100_0000);
        let d = fake(LayoutKind::FullyContiguous, 8, 0x200_0000);
        let r = req(&s, &[3, 2, 1], &d, &[7, 6, 5]);
        r.validate().unwrap();
        let mut copies = r.build().copies;
        assert_eq!(copies.len(), 3);
        sort_by_dst(&mut copies);
        assert_eq!(
            copies,
            vec![CopyOp {
                src: 0x100_0000 + 64,
                dst: 0x200_0000 + 5 * 64,
                len: 3 * 64
            }]
        );
        // Scattered sources stay separate copies, in ascending destination order.
        let mut copies = vec![
            CopyOp {
                src: 900,
                dst: 200,
                len: 100,
            },
            CopyOp {
                src: 100,
                dst: 0,
                len: 100,
            },
            CopyOp {
                src: 500,
                dst: 100,
                len: 100,
            },
        ];
        sort_by_dst(&mut copies);
        let dsts: Vec<u64> = copies.iter().map(|c| c.dst).collect();
        assert_eq!(dsts, [0, 100, 200]);
        assert_eq!(copies.iter().map(|c| c.len).sum::<u64>(), 300);
    }

    #[test]
    fn groups_cover_the_request_once_each_within_its_bytes() {
        let s = fake(LayoutKind::LayerSeparateOuterFirst, 16, 0x100_0000);
        let d = fake(LayoutKind::FullyContiguous, 16, 0x900_0000);
        let (sb, db): (Vec<u64>, Vec<u64>) = (0..11).map(|i| (i, (i * 5) % 16)).unzip();
        let r = req(&s, &sb, &d, &db);
        r.validate().unwrap();
        let mut all = r.build().copies;
        sort_by_dst(&mut all);
        // 64 bytes per pair (2 layers x 2 outer x 16).
        for (bytes, want) in [(0, 11), (64, 11), (130, 6), (640, 2), (1 << 20, 1)] {
            let groups: Vec<(Request<'_>, u64)> = r.groups(bytes).collect();
            assert_eq!(groups.len(), want, "{bytes}");
            let mut joined = Vec::new();
            for (g, b) in &groups {
                let list = g.build();
                assert_eq!(list.bytes, *b);
                assert!(*b <= bytes.max(64), "{b} > {bytes}");
                joined.extend(list.copies);
            }
            assert_eq!(groups.iter().map(|(_, b)| b).sum::<u64>(), 11 * 64);
            sort_by_dst(&mut joined);
            assert_eq!(joined, all, "{bytes}");
        }
        assert_eq!(req(&s, &[], &d, &[]).groups(64).count(), 0);
    }

    #[test]
    fn fc_to_fc_consecutive_ids_coalesce_into_one_copy() {
        let s = fake(LayoutKind::FullyContiguous, 8, 0x100_0000);
        let d = fake(LayoutKind::FullyContiguous, 8, 0x200_0000);
        let r = req(&s, &[2, 3, 4], &d, &[5, 6, 7]);
        r.validate().unwrap();
        let l = r.build();
        assert_eq!(l.fragments, 12);
        assert_eq!(l.bytes, 12 * 16);
        assert_eq!(
            l.copies,
            vec![CopyOp {
                src: 0x100_0000 + 2 * 64,
                dst: 0x200_0000 + 5 * 64,
                len: 3 * 64
            }]
        );
    }

    #[test]
    fn permuted_ids_do_not_coalesce_across_blocks() {
        let s = fake(LayoutKind::FullyContiguous, 8, 0x100_0000);
        let d = fake(LayoutKind::FullyContiguous, 8, 0x200_0000);
        let r = req(&s, &[0, 1, 2], &d, &[2, 1, 0]);
        r.validate().unwrap();
        let l = r.build();
        assert_eq!(l.copies.len(), 3); // each whole block is still one copy
        assert!(l.copies.iter().all(|c| c.len == 64));
    }

    #[test]
    fn layer_separate_coalesces_per_layer() {
        let s = fake(LayoutKind::LayerSeparateBlockFirst, 8, 0x100_0000);
        let d = fake(LayoutKind::LayerSeparateBlockFirst, 8, 0x200_0000);
        let r = req(&s, &[0, 1, 2, 3], &d, &[4, 5, 6, 7]);
        let l = r.build();
        assert_eq!(l.copies.len(), 2); // one per layer
        assert_eq!(l.copies[1].src, 0x110_0000);
        assert_eq!(l.copies[1].dst, 0x210_0000 + 4 * 32);
    }

    #[test]
    fn layer_range_limits_the_copies() {
        let s = fake(LayoutKind::LayerSeparateOuterFirst, 8, 0x100_0000);
        let d = fake(LayoutKind::FullyContiguous, 8, 0x200_0000);
        let mut r = req(&s, &[1], &d, &[1]);
        r.layers = 1..2;
        r.validate().unwrap();
        let l = r.build();
        assert_eq!(l.fragments, 2);
        // FC keeps (layer 1, outer 0) and (layer 1, outer 1) adjacent; LS-outer-first does not.
        assert_eq!(
            l.copies,
            vec![
                CopyOp {
                    src: 0x110_0000 + 16,
                    dst: 0x200_0000 + 64 + 32,
                    len: 16
                },
                CopyOp {
                    src: 0x110_0000 + 8 * 16 + 16,
                    dst: 0x200_0000 + 64 + 48,
                    len: 16
                },
            ]
        );
    }

    #[test]
    fn refusals() {
        let s = fake(LayoutKind::FullyContiguous, 8, 0x100_0000);
        let d = fake(LayoutKind::FullyContiguous, 8, 0x200_0000);
        let bad = |r: Request, f: fn(&Error) -> bool| {
            let e = r.validate().unwrap_err();
            assert!(f(&e), "{e:?}");
        };
        bad(req(&s, &[8], &d, &[0]), |e| {
            matches!(e, Error::OutOfRange(_))
        });
        bad(req(&s, &[0], &d, &[9]), |e| {
            matches!(e, Error::OutOfRange(_))
        });
        bad(
            req(&s, &[0, 1], &d, &[3, 3]),
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("more than once")),
        );
        bad(req(&s, &[0, 1], &d, &[3]), |e| {
            matches!(e, Error::InvalidArgument(_))
        });
        bad(
            req(&s, &[0, 1], &s, &[2, 1]),
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("block 1")),
        );
        // Broadcasting one source to many destinations is fine; moving within a layout too.
        req(&s, &[0, 0], &d, &[1, 2]).validate().unwrap();
        req(&s, &[0, 1], &s, &[2, 3]).validate().unwrap();

        let mut other = cfg(LayoutKind::FullyContiguous, 8);
        other.inner_dim = 8;
        let g = other.validate().unwrap();
        let wide = Layout::new(
            other,
            Memory::caller_owned(
                StorageKind::System,
                0,
                vec![Region {
                    addr: 0x300_0000,
                    len: g.allocation_len,
                }],
            ),
            1,
        )
        .unwrap();
        bad(
            req(&s, &[0], &wide, &[0]),
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("region size")),
        );
        let mut r = req(&s, &[0], &d, &[0]);
        r.layers = 1..3;
        bad(r, |e| matches!(e, Error::OutOfRange(_)));
    }

    #[test]
    fn absurdly_large_requests_are_refused_before_building() {
        // 65536 layers x K/V of 1-byte regions over fake addresses: 1024 blocks would be
        // 134M pieces. Nothing is dereferenced; the refusal comes first.
        let c = LayoutConfig {
            num_blocks: 1024,
            num_layers: 1 << 16,
            outer_dim: 2,
            page_size: 1,
            inner_dim: 1,
            dtype_width: 1,
            alignment: 1,
            kind: LayoutKind::FullyContiguous,
            heads: Default::default(),
        };
        let len = c.validate().unwrap().allocation_len;
        let mem = |addr| Memory::caller_owned(StorageKind::System, 0, vec![Region { addr, len }]);
        let s = Layout::new(c, mem(0x1000_0000_0000), 1).unwrap();
        let d = Layout::new(c, mem(0x2000_0000_0000), 1).unwrap();
        let ids: Vec<u64> = (0..1024).collect();
        let r = Request {
            src: &s,
            src_blocks: &ids,
            dst: &d,
            dst_blocks: &ids,
            layers: 0..1 << 16,
        };
        let e = r.validate().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(m) if m.contains("split it")));
    }

    #[test]
    fn overlapping_wrapped_layouts_are_refused() {
        // Two layouts over the same bytes, the second shifted by one block.
        let a = fake(LayoutKind::FullyContiguous, 8, 0x100_0000);
        let b = fake(LayoutKind::FullyContiguous, 8, 0x100_0000 + 64);
        let e = req(&a, &[1], &b, &[0]).validate().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(m) if m.contains("overlap")));
        req(&a, &[0], &b, &[1]).validate().unwrap(); // a.0 vs b.1 = a.2: disjoint
    }

    #[test]
    fn layer_resolution() {
        let s = fake(LayoutKind::FullyContiguous, 8, 0x100_0000);
        let d = fake(LayoutKind::FullyContiguous, 8, 0x200_0000);
        assert_eq!(resolve_layers(&s, &d, 0, 0).unwrap(), 0..2);
        assert_eq!(resolve_layers(&s, &d, 1, 2).unwrap(), 1..2);
        assert!(resolve_layers(&s, &d, 1, 1).is_err());
        assert!(matches!(
            resolve_layers(&s, &d, 0, 3),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn duplicate_detection_both_ways() {
        assert_eq!(first_duplicate(&[1, 2, 3], 4), None);
        assert_eq!(first_duplicate(&[1, 2, 1], 4), Some((2, 1)));
        let big = u64::MAX - 1;
        assert_eq!(first_duplicate(&[big, 5, big], u64::MAX), Some((2, big)));
        assert_eq!(first_duplicate(&[big, 5], u64::MAX), None);
    }

    #[test]
    fn one_pass_proves_valid_pairs_and_nothing_else() {
        assert!(pairs_valid(&[0, 7, 3], 8, &[5, 0, 99], 100));
        assert!(pairs_valid(&[], 8, &[], 0));
        // A source out of range, a destination out of range inside the bitmap's last word
        // and beyond it, a repeated destination.
        assert!(!pairs_valid(&[0, 8], 8, &[1, 2], 100));
        assert!(!pairs_valid(&[0, 1], 8, &[1, 100], 100));
        assert!(!pairs_valid(&[0, 1], 8, &[1, 1 << 40], 100));
        assert!(!pairs_valid(&[0, 1], 8, &[3, 3], 100));
        // The same thread's bitmap holds nothing from the call before.
        assert!(pairs_valid(&[0, 1], 8, &[3, 4], 100));
        // An id space far larger than the list is left to the separate checks.
        assert!(!pairs_valid(&[0], 8, &[0], 1 << 20));
        // A bitmap larger than the one kept is released after use, and the next call still
        // starts from an empty one.
        let ids: Vec<u64> = (0..1 << 15).collect();
        assert!(pairs_valid(&ids, 1 << 15, &ids, 1 << 21));
        SEEN.with_borrow(|seen| assert_eq!(seen.capacity(), 0));
        assert!(pairs_valid(&[0, 1], 8, &[3, 4], 100));
        // Byte marks (a small, dense id space) and the bitmap on either side of their bounds,
        // each with and without a repeat; marks left by a failing call do not leak into the next.
        for (ids, blocks) in [
            (MARKED_BLOCKS / 4, MARKED_BLOCKS),
            (MARKED_BLOCKS / 4, MARKED_BLOCKS + 1),
            (MARKED_BLOCKS / 4 - 1, MARKED_BLOCKS),
        ] {
            let ids: Vec<u64> = (0..ids).map(|i| blocks - 1 - 3 * i).collect();
            let mut dup = ids.clone();
            dup[7] = dup[1000];
            assert!(!pairs_valid(&ids, blocks, &dup, blocks), "{blocks}");
            assert!(pairs_valid(&ids, blocks, &ids, blocks), "{blocks}");
        }
        for n in [1u64, 63, 64, 65, 640] {
            let ids: Vec<u64> = (0..n).rev().collect();
            assert!(pairs_valid(&ids, n, &ids, n), "{n}");
            let mut dup = ids.clone();
            dup[0] = dup[n as usize - 1];
            assert_eq!(pairs_valid(&ids, n, &dup, n), n == 1, "{n}");
        }
    }

    /// The pairs as the kernel's table holds them at two bytes per id, one pair at a time.
    fn packed_one_by_one(src: &[u64], dst: &[u64]) -> Vec<u64> {
        let mut out = vec![0u64; src.len().div_ceil(2)];
        for (i, (&s, &d)) in src.iter().zip(dst).enumerate() {
            out[i / 2] |= (s | (d << 16)) << (32 * (i % 2));
        }
        out
    }

    #[test]
    fn one_pass_packs_what_it_checks_and_refuses_what_pairs_valid_refuses() {
        // Byte marks (dense ids), the bitmap (sparse ones), and both with a tail of 1-7 pairs.
        for (n, blocks) in [
            (0usize, 1u64),
            (1, 1),
            (7, 64),
            (9, 9),
            (4096, 4096),
            (4099, 1 << 16),
            (65536, 1 << 16),
            (30000, 40000),
        ] {
            let mut rng = fastrand::Rng::with_seed(n as u64 ^ blocks);
            let mut src: Vec<u64> = (0..blocks).collect();
            let mut dst = src.clone();
            rng.shuffle(&mut src);
            rng.shuffle(&mut dst);
            let (src, dst) = (&src[..n], &dst[..n]);
            let mut out = vec![u64::MAX; n.div_ceil(2)];
            assert!(
                check_and_pack16(src, blocks, dst, blocks, &mut out),
                "{n} {blocks}"
            );
            assert_eq!(out, packed_one_by_one(src, dst), "{n} {blocks}");
            let with = |v: &[u64], i: usize, x: u64| {
                let mut v = v.to_vec();
                v[i] = x;
                v
            };
            for i in [0, n / 2, n.saturating_sub(1)]
                .into_iter()
                .filter(|_| n > 0)
            {
                let cases = [
                    (with(src, i, blocks), dst.to_vec()),
                    (src.to_vec(), with(dst, i, blocks)),
                    (src.to_vec(), with(dst, i, u64::MAX)),
                    (with(src, i, 1 << 16), dst.to_vec()),
                ];
                for (s, d) in cases {
                    assert!(
                        !check_and_pack16(&s, blocks, &d, blocks, &mut out),
                        "{n} {i}"
                    );
                    assert!(!pairs_valid(&s, blocks, &d, blocks));
                }
                if n > 1 {
                    // A repeat with the first pair, and between the last two (in the tail).
                    for (a, b) in [(0, i.max(1)), (n - 2, n - 1)] {
                        let d = with(dst, b, dst[a]);
                        assert!(
                            !check_and_pack16(src, blocks, &d, blocks, &mut out),
                            "{n} {a}"
                        );
                    }
                }
            }
        }
        // Id spaces over 16 bits are not packed here.
        assert!(!check_and_pack16(&[0], 1 << 17, &[0], 1, &mut [0]));
    }

    #[test]
    fn validation_packs_narrow_ids_and_names_what_is_wrong_either_way() {
        let s = fake(LayoutKind::LayerSeparateBlockFirst, 40, 0x100_0000);
        let d = fake(LayoutKind::LayerSeparateBlockFirst, 40, 0x200_0000);
        let (sb, db): (Vec<u64>, Vec<u64>) = ((0..20).collect(), (20..40).rev().collect());
        let r = req(&s, &sb, &d, &db);
        r.validate_shape().unwrap();
        let mut out = vec![0u64; 10];
        assert!(r.validate_ids(Some(&mut out)).unwrap());
        assert_eq!(out, packed_one_by_one(&sb, &db));
        // Too few words to pack into: checked, not packed.
        assert!(!r.validate_ids(Some(&mut [0; 9])).unwrap());
        assert!(!r.validate_ids(None).unwrap());
        // A repeated destination is named whether or not the pass packs.
        let mut bad = db.clone();
        bad[19] = bad[3];
        let r = req(&s, &sb, &d, &bad);
        for packed in [Some(&mut out[..]), None] {
            match r.validate_ids(packed) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains("more than once"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
