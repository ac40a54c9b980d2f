//! Layout configuration, its validation and the address arithmetic of DESIGN.md.

use super::heads::Heads;
use crate::error::{Error, Result, bail};

/// How blocks, layers and the K/V dimension are arranged in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayoutKind {
    /// One allocation `[block][layer][outer][region]`.
    FullyContiguous,
    /// One allocation per layer, `[block][outer][region]`.
    LayerSeparateBlockFirst,
    /// One allocation per layer, `[outer][block][region]`.
    LayerSeparateOuterFirst,
}

impl LayoutKind {
    pub const ALL: [LayoutKind; 3] = [
        Self::FullyContiguous,
        Self::LayerSeparateBlockFirst,
        Self::LayerSeparateOuterFirst,
    ];

    pub fn short_name(self) -> &'static str {
        match self {
            Self::FullyContiguous => "FC",
            Self::LayerSeparateBlockFirst => "LS-block-first",
            Self::LayerSeparateOuterFirst => "LS-outer-first",
        }
    }
}

impl TryFrom<i32> for LayoutKind {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self> {
        Ok(match v {
            0 => Self::FullyContiguous,
            1 => Self::LayerSeparateBlockFirst,
            2 => Self::LayerSeparateOuterFirst,
            _ => bail!(
                InvalidArgument,
                "unknown layout kind {v} (expected 0..=2: FULLY_CONTIGUOUS, \
                 LAYER_SEPARATE_BLOCK_FIRST, LAYER_SEPARATE_OUTER_FIRST)"
            ),
        })
    }
}

/// What a caller asks for. `region = page_size × inner_dim × dtype_width` bytes is one
/// (block, layer, outer) piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutConfig {
    pub num_blocks: u64,
    pub num_layers: u64,
    /// 1, or 2 for separate K and V.
    pub outer_dim: u64,
    /// Tokens per block.
    pub page_size: u64,
    /// heads × head_dim.
    pub inner_dim: u64,
    /// 1 (FP8), 2, 4 or 8 bytes per element.
    pub dtype_width: u32,
    /// Power of two; pads the block stride and is required of every region's start.
    pub alignment: u32,
    pub kind: LayoutKind,
    /// The heads a region holds and their order (0.2); `Heads::OPAQUE` (the default): the
    /// region is opaque, and transfers need equal regions.
    pub heads: Heads,
}

/// The validated sizes derived from a [`LayoutConfig`]; all products are overflow-checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes of one (block, layer, outer) piece.
    pub region: u64,
    /// Distance between consecutive blocks inside one allocation.
    pub block_stride: u64,
    /// Bytes of each allocation (one for FC, one per layer for LS).
    pub allocation_len: u64,
    /// Number of allocations: 1 for FC, `num_layers` for LS.
    pub allocations: u64,
}

/// More layers than any model has; a bound keeps per-layer bookkeeping finite.
pub(crate) const MAX_LAYERS: u64 = 1 << 16;

fn mul(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_mul(b)
        .ok_or_else(|| Error::InvalidArgument(format!("layout too large: {what} overflows")))
}

fn align_up(v: u64, alignment: u64, what: &str) -> Result<u64> {
    v.checked_next_multiple_of(alignment)
        .ok_or_else(|| Error::InvalidArgument(format!("layout too large: {what} overflows")))
}

impl LayoutConfig {
    /// Checks every field and computes the geometry; any failure is `InvalidArgument`.
    pub fn validate(&self) -> Result<Geometry> {
        for (name, v) in [
            ("num_blocks", self.num_blocks),
            ("num_layers", self.num_layers),
            ("page_size", self.page_size),
            ("inner_dim", self.inner_dim),
        ] {
            if v == 0 {
                bail!(InvalidArgument, "{name} must be at least 1");
            }
        }
        if self.num_layers > MAX_LAYERS {
            bail!(
                InvalidArgument,
                "num_layers {} is above the limit of {MAX_LAYERS}",
                self.num_layers
            );
        }
        if !matches!(self.outer_dim, 1 | 2) {
            bail!(
                InvalidArgument,
                "outer_dim must be 1 or 2 (K and V), got {}",
                self.outer_dim
            );
        }
        if !matches!(self.dtype_width, 1 | 2 | 4 | 8) {
            bail!(
                InvalidArgument,
                "dtype_width_bytes must be 1, 2, 4 or 8, got {}",
                self.dtype_width
            );
        }
        self.heads.validate(self.inner_dim)?;
        if !self.alignment.is_power_of_two() {
            bail!(
                InvalidArgument,
                "alignment must be a power of two, got {}",
                self.alignment
            );
        }
        let align = u64::from(self.alignment);
        let region = mul(
            mul(self.page_size, self.inner_dim, "page_size × inner_dim")?,
            u64::from(self.dtype_width),
            "region size",
        )?;
        let per_layer = mul(self.outer_dim, region, "outer_dim × region")?;
        let (block_stride, allocation_len, allocations) = match self.kind {
            LayoutKind::FullyContiguous => {
                let stride = align_up(
                    mul(self.num_layers, per_layer, "block size")?,
                    align,
                    "block stride",
                )?;
                (stride, mul(self.num_blocks, stride, "layout size")?, 1)
            }
            LayoutKind::LayerSeparateBlockFirst => {
                let stride = align_up(per_layer, align, "block stride")?;
                let len = mul(self.num_blocks, stride, "layer size")?;
                (stride, len, self.num_layers)
            }
            LayoutKind::LayerSeparateOuterFirst => {
                let len = mul(
                    mul(self.num_blocks, region, "layer size")?,
                    self.outer_dim,
                    "",
                )?;
                (region, len, self.num_layers)
            }
        };
        // The whole layout must be addressable, also when all allocations are added up.
        mul(allocation_len, allocations, "total layout size")?;
        Ok(Geometry {
            region,
            block_stride,
            allocation_len,
            allocations,
        })
    }

    /// Allocation index and offset inside it of (block, layer, outer). The caller has checked
    /// the indices; with validated geometry nothing here can overflow.
    pub(crate) fn offset_unchecked(&self, g: &Geometry, b: u64, l: u64, o: u64) -> (usize, u64) {
        match self.kind {
            LayoutKind::FullyContiguous => (
                0,
                b * g.block_stride + l * self.outer_dim * g.region + o * g.region,
            ),
            LayoutKind::LayerSeparateBlockFirst => (l as usize, b * g.block_stride + o * g.region),
            LayoutKind::LayerSeparateOuterFirst => {
                (l as usize, o * self.num_blocks * g.region + b * g.region)
            }
        }
    }

    /// Range-checks (block, layer, outer).
    pub fn check_index(&self, b: u64, l: u64, o: u64) -> Result<()> {
        if b >= self.num_blocks {
            bail!(
                OutOfRange,
                "block {b} out of range (layout has {} blocks)",
                self.num_blocks
            );
        }
        if l >= self.num_layers {
            bail!(
                OutOfRange,
                "layer {l} out of range (layout has {} layers)",
                self.num_layers
            );
        }
        if o >= self.outer_dim {
            bail!(
                OutOfRange,
                "outer {o} out of range (layout has outer_dim {})",
                self.outer_dim
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: LayoutKind) -> LayoutConfig {
        LayoutConfig {
            num_blocks: 10,
            num_layers: 3,
            outer_dim: 2,
            page_size: 4,
            inner_dim: 6,
            dtype_width: 2,
            alignment: 1,
            kind,
            heads: Default::default(),
        }
    }

    #[test]
    fn fully_contiguous_offsets_match_hand_computation() {
        let c = cfg(LayoutKind::FullyContiguous);
        let g = c.validate().unwrap();
        // region = 4*6*2 = 48; block = 3 layers * 2 outer * 48 = 288
        assert_eq!(g.region, 48);
        assert_eq!(g.block_stride, 288);
        assert_eq!(g.allocation_len, 2880);
        assert_eq!(g.allocations, 1);
        assert_eq!(c.offset_unchecked(&g, 0, 0, 0), (0, 0));
        assert_eq!(c.offset_unchecked(&g, 0, 0, 1), (0, 48));
        assert_eq!(c.offset_unchecked(&g, 0, 1, 0), (0, 96));
        assert_eq!(c.offset_unchecked(&g, 2, 2, 1), (0, 2 * 288 + 2 * 96 + 48));
    }

    #[test]
    fn alignment_pads_block_stride() {
        let mut c = cfg(LayoutKind::FullyContiguous);
        c.alignment = 256;
        let g = c.validate().unwrap();
        assert_eq!(g.block_stride, 512); // 288 rounded up
        assert_eq!(c.offset_unchecked(&g, 3, 1, 1), (0, 3 * 512 + 96 + 48));

        let mut c = cfg(LayoutKind::LayerSeparateBlockFirst);
        c.alignment = 64;
        let g = c.validate().unwrap();
        assert_eq!(g.block_stride, 128); // 96 rounded up
        assert_eq!(g.allocation_len, 1280);
        assert_eq!(c.offset_unchecked(&g, 7, 2, 1), (2, 7 * 128 + 48));
    }

    #[test]
    fn layer_separate_offsets_match_hand_computation() {
        let c = cfg(LayoutKind::LayerSeparateBlockFirst);
        let g = c.validate().unwrap();
        assert_eq!((g.allocations, g.allocation_len), (3, 960));
        assert_eq!(c.offset_unchecked(&g, 4, 1, 1), (1, 4 * 96 + 48));

        let c = cfg(LayoutKind::LayerSeparateOuterFirst);
        let g = c.validate().unwrap();
        assert_eq!((g.allocations, g.allocation_len), (3, 960));
        assert_eq!(c.offset_unchecked(&g, 4, 2, 1), (2, 10 * 48 + 4 * 48));
        assert_eq!(c.offset_unchecked(&g, 9, 0, 0), (0, 9 * 48));
    }

    #[test]
    fn fp8_and_wide_dtypes() {
        for (w, region) in [(1, 24), (2, 48), (4, 96), (8, 192)] {
            let mut c = cfg(LayoutKind::FullyContiguous);
            c.dtype_width = w;
            assert_eq!(c.validate().unwrap().region, region);
        }
    }

    #[test]
    fn invalid_configs_are_refused() {
        let base = cfg(LayoutKind::FullyContiguous);
        let bad = [
            LayoutConfig {
                num_blocks: 0,
                ..base
            },
            LayoutConfig {
                num_layers: 0,
                ..base
            },
            LayoutConfig {
                outer_dim: 3,
                ..base
            },
            LayoutConfig {
                page_size: 0,
                ..base
            },
            LayoutConfig {
                inner_dim: 0,
                ..base
            },
            LayoutConfig {
                dtype_width: 3,
                ..base
            },
            LayoutConfig {
                alignment: 0,
                ..base
            },
            LayoutConfig {
                alignment: 48,
                ..base
            },
            LayoutConfig {
                num_blocks: u64::MAX,
                ..base
            },
            LayoutConfig {
                inner_dim: u64::MAX / 2,
                ..base
            },
            LayoutConfig {
                num_layers: u64::MAX / 4,
                kind: LayoutKind::LayerSeparateOuterFirst,
                ..base
            },
        ];
        for c in bad {
            assert!(
                matches!(c.validate(), Err(Error::InvalidArgument(_))),
                "{c:?} was accepted"
            );
        }
    }

    #[test]
    fn index_checks() {
        let c = cfg(LayoutKind::FullyContiguous);
        assert!(c.check_index(9, 2, 1).is_ok());
        assert!(matches!(c.check_index(10, 0, 0), Err(Error::OutOfRange(_))));
        assert!(matches!(c.check_index(0, 3, 0), Err(Error::OutOfRange(_))));
        assert!(matches!(c.check_index(0, 0, 2), Err(Error::OutOfRange(_))));
        assert!(LayoutKind::try_from(3).is_err());
        assert!(LayoutKind::try_from(-1).is_err());
    }
}
