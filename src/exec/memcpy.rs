//! Host ↔ host copies: the copy list is cut into equal byte shares, one per worker.

use crate::layout::heads::Piece;
use crate::plan::CopyOp;

/// Below this a transfer is not worth splitting across threads.
pub(crate) const MIN_SHARE_BYTES: u64 = 1 << 20;

/// Cuts `copies` into at most `parts` lists of about equal bytes, splitting copies that cross a
/// share boundary, keeping order. Never returns an empty list of shares for non-empty input.
pub fn split(copies: &[CopyOp], parts: usize) -> Vec<Vec<CopyOp>> {
    split_shares(copies, parts, MIN_SHARE_BYTES)
}

/// As `split`, with shares of at least `min_share` bytes.
fn split_shares(copies: &[CopyOp], parts: usize, min_share: u64) -> Vec<Vec<CopyOp>> {
    let total: u64 = copies.iter().map(|c| c.len).sum();
    let parts = (parts.max(1) as u64).min(total.div_ceil(min_share.max(1)).max(1));
    let share = total.div_ceil(parts);
    let mut out = Vec::with_capacity(parts as usize);
    let mut current = Vec::new();
    let mut room = share;
    for &c in copies {
        let mut c = c;
        while c.len > room {
            if room > 0 {
                current.push(CopyOp { len: room, ..c });
                c = CopyOp {
                    src: c.src + room,
                    dst: c.dst + room,
                    len: c.len - room,
                };
            }
            out.push(std::mem::take(&mut current));
            room = share;
        }
        if c.len > 0 {
            current.push(c);
            room -= c.len;
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Transfers at least this large bypass the caches on the destination side.
pub(crate) const STREAMING_MIN_BYTES: u64 = 8 << 20;

/// Copies every entry of `copies`; with `streaming`, through non-temporal stores.
///
/// # Safety
/// Every source and destination range must be valid host memory for its length, and no
/// destination may overlap a source or another destination (what `Request::validate`
/// establishes), nor be accessed by anyone else during the call.
pub unsafe fn copy_all(copies: &[CopyOp], streaming: bool) {
    for c in copies {
        // SAFETY: guaranteed by this function's contract.
        unsafe { copy_one(c.src, c.dst, c.len, streaming) };
    }
    if streaming {
        // Non-temporal stores are weakly ordered: make them visible before completion is
        // published to other threads.
        stream::fence();
    }
}

/// A place in a copy list: the copy's index and a byte offset into it.
pub(crate) type Cut = (usize, u64);

/// Cuts `copies`, `total` bytes in all, into `parts` spans of about equal bytes (fewer when
/// there are fewer bytes than parts), as the `parts + 1` places between them, the first
/// `(0, 0)` and the last `(copies.len(), 0)`; a span may start and end inside a copy. One pass
/// and one small allocation: copying the list into one vector per share cost the caller of a
/// shared host copy ~45 µs per 8192 copies on the build machine.
pub(crate) fn cuts(copies: &[CopyOp], total: u64, parts: usize) -> Vec<Cut> {
    let parts = (parts.max(1) as u64).min(total.max(1));
    let share = total.div_ceil(parts).max(1);
    let mut out = Vec::with_capacity(parts as usize + 1);
    out.push((0, 0));
    let (mut at, mut next) = (0u64, share);
    for (i, c) in copies.iter().enumerate() {
        let end = at + c.len;
        // A cut at `end` falls at the start of the next copy instead.
        while next < end {
            out.push((i, next - at));
            next += share;
        }
        at = end;
    }
    out.push((copies.len(), 0));
    out
}

/// Copies the bytes of `copies` from place `from` to place `to` (`cuts`); with `streaming`,
/// through non-temporal stores.
///
/// # Safety
/// As `copy_all`, for every copy the span touches.
pub(crate) unsafe fn copy_span(copies: &[CopyOp], from: Cut, to: Cut, streaming: bool) {
    let part = |i: usize, a: u64, b: u64| {
        let c = copies[i];
        // SAFETY: a sub-range of a copy the caller vouched for.
        unsafe { copy_one(c.src + a, c.dst + a, b - a, streaming) };
    };
    if from.0 == to.0 {
        if to.1 > from.1 {
            part(from.0, from.1, to.1);
        }
    } else {
        part(from.0, from.1, copies[from.0].len);
        for c in &copies[from.0 + 1..to.0] {
            // SAFETY: a whole copy the caller vouched for.
            unsafe { copy_one(c.src, c.dst, c.len, streaming) };
        }
        if to.1 > 0 {
            part(to.0, 0, to.1);
        }
    }
    if streaming {
        stream::fence();
    }
}

/// One copy, through non-temporal stores with `streaming` (the caller fences after its last).
///
/// # Safety
/// As `copy_all`, for this one range.
#[inline]
unsafe fn copy_one(src: u64, dst: u64, len: u64, streaming: bool) {
    let (src, dst, len) = (src as *const u8, dst as *mut u8, len as usize);
    if streaming {
        // SAFETY: forwarded to the caller.
        unsafe { stream::copy(src, dst, len) };
    } else {
        // SAFETY: forwarded to the caller.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }
}

/// Copies every piece of `pieces` (offsets) from each region pair of `pairs`: a head
/// transform's share, without materialising one copy per piece; with `streaming`, through
/// non-temporal stores.
///
/// # Safety
/// As `copy_all`, for every `(src + p.src, dst + p.dst, p.len)`.
pub unsafe fn copy_pieces(pairs: &[(u64, u64)], pieces: &[Piece], streaming: bool) {
    for &(s, d) in pairs {
        for p in pieces {
            // SAFETY: guaranteed by this function's contract.
            unsafe { copy_one(s + p.src, d + p.dst, p.len, streaming) };
        }
    }
    if streaming {
        stream::fence();
    }
}

/// A copy whose stores bypass the caches. glibc's memcpy switches to non-temporal stores only
/// for copies near the cache size, so a large transfer made of many small fragments would
/// otherwise read every destination line before writing it: a third more memory traffic.
#[cfg(target_arch = "x86_64")]
mod stream {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};

    /// # Safety
    /// `src` and `dst` are valid, non-overlapping ranges of `len` bytes.
    pub unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
        let head = dst.align_offset(16).min(len);
        // SAFETY: the caller's ranges; each access below stays inside [0, len).
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, head);
            let mut i = head;
            while i + 64 <= len {
                let s = src.add(i) as *const __m128i;
                let d = dst.add(i) as *mut __m128i;
                let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
                let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
                // `d` is 16-byte aligned: `head` aligned the destination.
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
                i += 64;
            }
            std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        }
    }

    pub fn fence() {
        // SAFETY: sfence has no preconditions; SSE2 is part of x86-64.
        unsafe { _mm_sfence() }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod stream {
    /// # Safety
    /// `src` and `dst` are valid, non-overlapping ranges of `len` bytes.
    pub unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded to the caller.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
    }

    pub fn fence() {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(src: u64, dst: u64, len: u64) -> CopyOp {
        CopyOp { src, dst, len }
    }

    #[test]
    fn split_keeps_every_byte_once_and_in_order() {
        let copies = vec![c(0, 100_000_000, 3 << 20), c(1 << 30, 1 << 31, 1 << 20)];
        let parts = split(&copies, 4);
        assert_eq!(parts.len(), 4);
        for p in &parts {
            assert_eq!(p.iter().map(|c| c.len).sum::<u64>(), 1 << 20);
        }
        let flat: Vec<CopyOp> = parts.concat();
        assert_eq!(flat[0], c(0, 100_000_000, 1 << 20));
        assert_eq!(flat[1], c(1 << 20, 100_000_000 + (1 << 20), 1 << 20));
        assert_eq!(flat.last().unwrap(), &copies[1]);
    }

    #[test]
    fn streaming_copy_matches_memcpy_at_every_alignment() {
        let src: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in 0..17 {
            for len in [0, 1, 15, 16, 63, 64, 65, 200, 1000] {
                let mut dst = vec![0u8; 1100];
                let c = CopyOp {
                    src: src.as_ptr() as u64 + 3,
                    dst: dst.as_mut_ptr() as u64 + off,
                    len,
                };
                // SAFETY: both ranges lie inside the two vectors.
                unsafe { copy_all(&[c], true) };
                let off = off as usize;
                assert_eq!(&dst[off..off + len as usize], &src[3..3 + len as usize]);
                assert!(dst[..off].iter().all(|&b| b == 0));
                assert!(dst[off + len as usize..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn spans_between_cuts_copy_every_byte_once() {
        for lens in [
            vec![4096u64; 64],
            vec![7, 1 << 20, 0, 3, 5000, 1],
            vec![0, 0],
            vec![],
        ] {
            let total: u64 = lens.iter().sum();
            let src: Vec<u8> = (0..total).map(|i| (i * 13 % 251) as u8 + 1).collect();
            for parts in [1, 2, 3, 7, 64, 1000] {
                let mut dst = vec![0u8; total as usize];
                // Each copy lands in reverse order of the sources.
                let (mut s, mut d) = (0u64, total);
                let copies: Vec<CopyOp> = lens
                    .iter()
                    .map(|&len| {
                        d -= len;
                        let c = c(src.as_ptr() as u64 + s, dst.as_mut_ptr() as u64 + d, len);
                        s += len;
                        c
                    })
                    .collect();
                let cuts = cuts(&copies, total, parts);
                assert_eq!(cuts.first(), Some(&(0, 0)));
                assert_eq!(cuts.last(), Some(&(copies.len(), 0)));
                assert!(cuts.len() <= parts + 1);
                if total > 0 {
                    assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{cuts:?}");
                }
                for w in cuts.windows(2) {
                    for streaming in [false, true] {
                        // SAFETY: every copy lies inside `src` and `dst`; copying a span twice
                        // writes the same bytes.
                        unsafe { copy_span(&copies, w[0], w[1], streaming) };
                    }
                }
                let mut want = Vec::new();
                let mut s = 0usize;
                for &len in &lens {
                    want.push(&src[s..s + len as usize]);
                    s += len as usize;
                }
                let want: Vec<u8> = want.into_iter().rev().flatten().copied().collect();
                assert_eq!(dst, want, "{lens:?} in {parts}");
            }
        }
    }

    #[test]
    fn small_transfers_are_not_split() {
        let copies = vec![c(0, 4096, 4096), c(8192, 16384, 4096)];
        assert_eq!(split(&copies, 16), vec![copies.clone()]);
        assert!(split(&[], 4).is_empty());
    }

    #[test]
    fn uneven_sizes_produce_at_most_parts_shares() {
        let copies: Vec<CopyOp> = (0..1000)
            .map(|i| c(i * 10_000, (i + 5000) * 10_000, 7777))
            .collect();
        for parts in 1..9 {
            let s = split(&copies, parts);
            assert!(s.len() <= parts);
            assert_eq!(s.iter().flatten().map(|c| c.len).sum::<u64>(), 7_777_000);
        }
    }
}
