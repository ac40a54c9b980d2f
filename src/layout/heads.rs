//! The inner structure of a region, for transfers between engines sharded or laid out
//! differently (0.2): which of a layer's KV heads a layout holds, and in which order a region
//! stores them. A transform copies, for every (block, layer, outer) pair, the heads both sides
//! hold, each in its side's order; `pieces` cuts one region pair into those copies once per
//! transfer, and every fragment reuses them at its own addresses.

use crate::error::{Result, bail};

/// How a region orders its tokens and heads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HeadOrder {
    /// `[page][head][dim]`: token-major (NHD).
    #[default]
    TokenMajor,
    /// `[head][page][dim]`: head-major (HND).
    HeadMajor,
}

impl TryFrom<i32> for HeadOrder {
    type Error = crate::Error;
    fn try_from(v: i32) -> Result<Self> {
        Ok(match v {
            0 => Self::TokenMajor,
            1 => Self::HeadMajor,
            _ => bail!(
                InvalidArgument,
                "unknown head_order {v} (expected 0: KVX_HEAD_ORDER_NHD or 1: KVX_HEAD_ORDER_HND)"
            ),
        })
    }
}

/// The heads a layout holds: `num_heads` of them from `head_begin` on, in `order`.
/// `num_heads == 0`: the region is opaque (0.1), and `head_begin` and `order` mean nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Heads {
    pub num_heads: u32,
    pub head_begin: u32,
    pub order: HeadOrder,
}

impl Heads {
    /// An opaque region.
    pub const OPAQUE: Self = Self {
        num_heads: 0,
        head_begin: 0,
        order: HeadOrder::TokenMajor,
    };

    pub fn is_opaque(&self) -> bool {
        self.num_heads == 0
    }

    /// Checks the heads against the region's `inner_dim`: they must divide it, and the head
    /// range must be representable.
    pub(crate) fn validate(&self, inner_dim: u64) -> Result<()> {
        if self.is_opaque() {
            return Ok(());
        }
        if !inner_dim.is_multiple_of(u64::from(self.num_heads)) {
            bail!(
                InvalidArgument,
                "num_heads {} does not divide inner_dim {inner_dim}: head_dim would not be whole",
                self.num_heads
            );
        }
        if self.head_begin.checked_add(self.num_heads).is_none() {
            bail!(
                InvalidArgument,
                "head range {} + {} does not fit a 32-bit head index",
                self.head_begin,
                self.num_heads
            );
        }
        Ok(())
    }

    fn end(&self) -> u32 {
        self.head_begin + self.num_heads
    }
}

/// One side of a transform: its heads, tokens per region and bytes of one head of one token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Side {
    pub heads: Heads,
    pub page_size: u64,
    pub head_bytes: u64,
}

impl Side {
    /// Offset in the region of (token `t`, head `h`), `h` one of the side's heads.
    fn offset(&self, t: u64, h: u32) -> u64 {
        let i = u64::from(h - self.heads.head_begin);
        let n = u64::from(self.heads.num_heads);
        match self.heads.order {
            HeadOrder::TokenMajor => (t * n + i) * self.head_bytes,
            HeadOrder::HeadMajor => (i * self.page_size + t) * self.head_bytes,
        }
    }
}

/// One copy inside a region pair: offsets from each region's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// The copies that move the heads both sides hold from a `src` region into a `dst` region,
/// neighbours merged: whole head runs where both orders keep them together (one piece for
/// equal heads in equal orders), one head of one token where the orders differ. Sides were
/// checked compatible (`check`).
pub(crate) fn pieces(src: &Side, dst: &Side) -> Vec<Piece> {
    let (lo, hi) = (
        src.heads.head_begin.max(dst.heads.head_begin),
        src.heads.end().min(dst.heads.end()),
    );
    let mut out: Vec<Piece> = Vec::new();
    let mut push = |p: Piece| match out.last_mut() {
        Some(last) if last.src + last.len == p.src && last.dst + last.len == p.dst => {
            last.len += p.len
        }
        _ => out.push(p),
    };
    let hb = src.head_bytes;
    // Walk in the destination's order so that its bytes are written front to back.
    match dst.heads.order {
        HeadOrder::TokenMajor => {
            for t in 0..src.page_size {
                for h in lo..hi {
                    push(Piece {
                        src: src.offset(t, h),
                        dst: dst.offset(t, h),
                        len: hb,
                    });
                }
            }
        }
        HeadOrder::HeadMajor => {
            for h in lo..hi {
                for t in 0..src.page_size {
                    push(Piece {
                        src: src.offset(t, h),
                        dst: dst.offset(t, h),
                        len: hb,
                    });
                }
            }
        }
    }
    out
}

/// Checks that a transform between `src` and `dst` (both describing their heads) is defined:
/// equal tokens per region, head size and element width, and at least one common head.
pub(crate) fn check(src: &Side, dst: &Side, src_width: u32, dst_width: u32) -> Result<()> {
    if src.page_size != dst.page_size {
        bail!(
            InvalidArgument,
            "a head transform needs equal page_size ({} vs {} tokens)",
            src.page_size,
            dst.page_size
        );
    }
    if src_width != dst_width {
        bail!(
            InvalidArgument,
            "a head transform needs equal dtype_width_bytes ({src_width} vs {dst_width})"
        );
    }
    if src.head_bytes != dst.head_bytes {
        bail!(
            InvalidArgument,
            "a head transform needs equal head_dim ({} vs {} elements)",
            src.head_bytes / u64::from(src_width),
            dst.head_bytes / u64::from(dst_width)
        );
    }
    let (lo, hi) = (
        src.heads.head_begin.max(dst.heads.head_begin),
        src.heads.end().min(dst.heads.end()),
    );
    if lo >= hi {
        bail!(
            InvalidArgument,
            "the layouts hold no head in common (source heads {}..{}, destination heads {}..{})",
            src.heads.head_begin,
            src.heads.end(),
            dst.heads.head_begin,
            dst.heads.end()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(num_heads: u32, head_begin: u32, order: HeadOrder) -> Side {
        Side {
            heads: Heads {
                num_heads,
                head_begin,
                order,
            },
            page_size: 4,
            head_bytes: 8,
        }
    }

    /// Every (token, head) both hold, by brute force: (src offset, dst offset).
    fn expected(src: &Side, dst: &Side) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for t in 0..src.page_size {
            for h in 0..64 {
                let has = |s: &Side| h >= s.heads.head_begin && h < s.heads.end();
                if has(src) && has(dst) {
                    v.push((src.offset(t, h), dst.offset(t, h)));
                }
            }
        }
        v.sort_unstable();
        v
    }

    /// The pieces, cut back into single heads of single tokens.
    fn covered(p: &[Piece], head_bytes: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = p
            .iter()
            .flat_map(|p| {
                (0..p.len / head_bytes)
                    .map(move |k| (p.src + k * head_bytes, p.dst + k * head_bytes))
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn every_common_head_of_every_token_is_copied_once_in_every_combination() {
        use HeadOrder::*;
        for (sn, sb) in [(8, 0), (4, 0), (4, 4), (2, 2), (1, 5), (8, 8)] {
            for (dn, db) in [(8, 0), (2, 0), (4, 2), (1, 5), (16, 0)] {
                for so in [TokenMajor, HeadMajor] {
                    for d_o in [TokenMajor, HeadMajor] {
                        let (s, d) = (side(sn, sb, so), side(dn, db, d_o));
                        if check(&s, &d, 2, 2).is_err() {
                            assert!(expected(&s, &d).is_empty());
                            continue;
                        }
                        let p = pieces(&s, &d);
                        assert_eq!(
                            covered(&p, 8),
                            expected(&s, &d),
                            "{sn}@{sb} {so:?} -> {dn}@{db} {d_o:?}"
                        );
                        // Destination bytes are never written twice.
                        let mut dsts: Vec<u64> = covered(&p, 8).iter().map(|x| x.1).collect();
                        dsts.dedup();
                        assert_eq!(dsts.len(), covered(&p, 8).len());
                    }
                }
            }
        }
    }

    #[test]
    fn equal_heads_in_equal_orders_are_one_piece_and_splits_are_runs() {
        use HeadOrder::*;
        for o in [TokenMajor, HeadMajor] {
            assert_eq!(
                pieces(&side(8, 0, o), &side(8, 0, o)),
                vec![Piece {
                    src: 0,
                    dst: 0,
                    len: 4 * 8 * 8
                }]
            );
        }
        // TP 1 -> 2, rank 1 (heads 4..8), head-major: one run of 4 heads x 4 tokens.
        assert_eq!(
            pieces(&side(8, 0, HeadMajor), &side(4, 4, HeadMajor)),
            vec![Piece {
                src: 4 * 4 * 8,
                dst: 0,
                len: 4 * 4 * 8
            }]
        );
        // Token-major: one run of 4 heads per token.
        let p = pieces(&side(8, 0, TokenMajor), &side(4, 4, TokenMajor));
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|p| p.len == 32));
        // Orders differ: one head of one token per piece (where runs cannot merge).
        let p = pieces(&side(4, 0, TokenMajor), &side(4, 0, HeadMajor));
        assert_eq!(p.len(), 16);
    }

    #[test]
    fn incompatible_sides_are_refused() {
        use HeadOrder::*;
        let (a, b) = (side(4, 0, TokenMajor), side(4, 4, TokenMajor));
        assert!(check(&a, &b, 2, 2).is_err(), "no common head");
        let mut c = side(4, 0, TokenMajor);
        c.page_size = 8;
        assert!(check(&a, &c, 2, 2).is_err(), "page size");
        let mut c = side(4, 0, TokenMajor);
        c.head_bytes = 16;
        assert!(check(&a, &c, 2, 2).is_err(), "head_dim");
        assert!(check(&a, &side(2, 0, HeadMajor), 2, 1).is_err(), "width");
        assert!(check(&a, &side(2, 2, HeadMajor), 2, 2).is_ok());
        let h = Heads {
            num_heads: 3,
            head_begin: 0,
            order: TokenMajor,
        };
        assert!(h.validate(8).is_err(), "3 does not divide 8");
        assert!(h.validate(12).is_ok());
        let h = Heads {
            num_heads: 2,
            head_begin: u32::MAX,
            order: TokenMajor,
        };
        assert!(h.validate(8).is_err(), "range overflows");
        assert!(Heads::OPAQUE.validate(7).is_ok());
    }
}
