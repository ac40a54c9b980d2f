//! Host ↔ host copies: the copy list is cut into equal byte shares, one per worker.

use crate::plan::CopyOp;

/// Below this a transfer is not worth splitting across threads.
pub(crate) const MIN_SHARE_BYTES: u64 = 1 << 20;

/// Cuts `copies` into at most `parts` lists of about equal bytes, splitting copies that cross a
/// share boundary, keeping order. Never returns an empty list of shares for non-empty input.
pub fn split(copies: &[CopyOp], parts: usize) -> Vec<Vec<CopyOp>> {
    let total: u64 = copies.iter().map(|c| c.len).sum();
    let parts = (parts.max(1) as u64).min(total.div_ceil(MIN_SHARE_BYTES).max(1));
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

/// Copies every entry of `copies`.
///
/// # Safety
/// Every source and destination range must be valid host memory for its length, and no
/// destination may overlap a source or another destination (what `Request::validate`
/// establishes), nor be accessed by anyone else during the call.
pub unsafe fn copy_all(copies: &[CopyOp]) {
    for c in copies {
        // SAFETY: guaranteed by this function's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(c.src as *const u8, c.dst as *mut u8, c.len as usize)
        };
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
