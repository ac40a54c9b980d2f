//! The seed's strategy table (Dynamo KV block manager `strategy.rs`): which mechanism moves
//! data between two storage locations, when it must bounce through pinned memory, and which
//! pairs are refused. Refusals are error values, never panics.

use crate::error::{Error, Result, bail};
use crate::memory::StorageKind;

/// One mechanism that moves bytes. The discriminants are the C API's `KVX_STRATEGY_*` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    Memcpy = 0,
    CudaAsyncH2D = 1,
    CudaAsyncD2H = 2,
    CudaAsyncD2D = 3,
    CudaBlockingH2D = 4,
    CudaBlockingD2H = 5,
    NixlRead = 6,
    NixlWrite = 7,
    NixlWriteFlipped = 8,
    NixlReadFlipped = 9,
    Invalid = 10,
}

impl Strategy {
    pub const ALL: [Strategy; 11] = [
        Self::Memcpy,
        Self::CudaAsyncH2D,
        Self::CudaAsyncD2H,
        Self::CudaAsyncD2D,
        Self::CudaBlockingH2D,
        Self::CudaBlockingD2H,
        Self::NixlRead,
        Self::NixlWrite,
        Self::NixlWriteFlipped,
        Self::NixlReadFlipped,
        Self::Invalid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Memcpy => "Memcpy",
            Self::CudaAsyncH2D => "CudaAsyncH2D",
            Self::CudaAsyncD2H => "CudaAsyncD2H",
            Self::CudaAsyncD2D => "CudaAsyncD2D",
            Self::CudaBlockingH2D => "CudaBlockingH2D",
            Self::CudaBlockingD2H => "CudaBlockingD2H",
            Self::NixlRead => "NixlRead",
            Self::NixlWrite => "NixlWrite",
            Self::NixlWriteFlipped => "NixlWriteFlipped",
            Self::NixlReadFlipped => "NixlReadFlipped",
            Self::Invalid => "Invalid",
        }
    }
}

impl TryFrom<i32> for Strategy {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self> {
        usize::try_from(v)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or_else(|| Error::InvalidArgument(format!("unknown strategy {v}")))
    }
}

/// How a transfer is carried out: in one hop, or staged through a bounce buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plan {
    Direct(Strategy),
    TwoHop {
        first: Strategy,
        bounce: StorageKind,
        second: Strategy,
    },
}

impl Plan {
    /// The strategy of the first (or only) hop.
    pub fn first(self) -> Strategy {
        match self {
            Plan::Direct(s) | Plan::TwoHop { first: s, .. } => s,
        }
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Direct(s) => write!(f, "Direct({})", s.name()),
            Plan::TwoHop {
                first,
                bounce,
                second,
            } => write!(
                f,
                "TwoHop({} -> {bounce} -> {})",
                first.name(),
                second.name()
            ),
        }
    }
}

/// Optional direct paths; both off by default (the seed's conservative policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// GPUDirect Storage: Device ↔ Disk without a host bounce.
    pub allow_gds: bool,
    /// GPU RDMA: Device ↔ Remote.
    pub allow_gpu_rdma: bool,
}

/// A storage location as the planner sees it: its kind, and whether a peer owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub kind: StorageKind,
    pub remote: bool,
}

impl Location {
    /// Where `layout` lives.
    pub fn of(layout: &crate::layout::Layout) -> Self {
        Self {
            kind: layout.storage_kind(),
            remote: layout.is_remote(),
        }
    }

    pub fn local(kind: StorageKind) -> Self {
        Self {
            kind,
            remote: false,
        }
    }

    pub fn remote(kind: StorageKind) -> Self {
        Self { kind, remote: true }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.remote {
            write!(f, "remote {}", self.kind)
        } else {
            write!(f, "local {}", self.kind)
        }
    }
}

/// The seed's `select_strategy`: both local → the direct table; one remote → the v2 remote
/// rules; both remote → refused.
pub fn select(src: Location, dst: Location, caps: Capabilities) -> Result<Plan> {
    match (src.remote, dst.remote) {
        (false, false) => Ok(select_direct(src.kind, dst.kind, caps)),
        (true, true) => bail!(
            Unsupported,
            "{src} -> {dst}: both source and destination are remote; one side must be local"
        ),
        _ => select_remote(src, dst, caps),
    }
}

/// The seed's `select_direct_strategy` for two local locations. Every pair has a plan.
fn select_direct(src: StorageKind, dst: StorageKind, caps: Capabilities) -> Plan {
    use Plan::{Direct, TwoHop};
    use StorageKind::*;
    use Strategy::*;
    match (src, dst) {
        (System | Pinned, System | Pinned) => Direct(Memcpy),
        (System, Device) => Direct(CudaBlockingH2D),
        (Pinned, Device) => Direct(CudaAsyncH2D),
        (Device, System) => Direct(CudaBlockingD2H),
        (Device, Pinned) => Direct(CudaAsyncD2H),
        (Device, Device) => Direct(CudaAsyncD2D),
        (System | Pinned, Disk) => Direct(NixlWrite),
        (Disk, System | Pinned) => Direct(NixlReadFlipped),
        (Disk, Disk) => TwoHop {
            first: NixlReadFlipped,
            bounce: Pinned,
            second: NixlWrite,
        },
        (Device, Disk) if caps.allow_gds => Direct(NixlWrite),
        (Device, Disk) => TwoHop {
            first: CudaAsyncD2H,
            bounce: Pinned,
            second: NixlWrite,
        },
        (Disk, Device) if caps.allow_gds => Direct(NixlRead),
        (Disk, Device) => TwoHop {
            first: NixlReadFlipped,
            bounce: Pinned,
            second: CudaAsyncH2D,
        },
    }
}

/// The seed's `select_remote_strategy_v2`: exactly one side is remote. (The seed's unused v1
/// table staged Disk→Remote with a write as first hop; kvxfer follows v2, which refuses disk.)
fn select_remote(src: Location, dst: Location, caps: Capabilities) -> Result<Plan> {
    use StorageKind::{Device, Disk};
    if src.kind == Disk || dst.kind == Disk {
        bail!(
            Unsupported,
            "{src} -> {dst}: disk on either side of a remote transfer is not supported; \
             stage the blocks through host memory first"
        );
    }
    if (src.kind == Device || dst.kind == Device) && !caps.allow_gpu_rdma {
        bail!(
            Unsupported,
            "{src} -> {dst}: device memory in a remote transfer needs GPU RDMA \
             (set allow_gpu_rdma in the context config)"
        );
    }
    Ok(if dst.remote {
        Plan::Direct(Strategy::NixlWrite)
    } else {
        Plan::Direct(Strategy::NixlReadFlipped)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use StorageKind::*;
    use Strategy::*;

    const OFF: Capabilities = Capabilities {
        allow_gds: false,
        allow_gpu_rdma: false,
    };
    const GDS: Capabilities = Capabilities {
        allow_gds: true,
        allow_gpu_rdma: false,
    };
    const RDMA: Capabilities = Capabilities {
        allow_gds: false,
        allow_gpu_rdma: true,
    };
    const ALL_CAPS: [Capabilities; 4] = [
        OFF,
        GDS,
        RDMA,
        Capabilities {
            allow_gds: true,
            allow_gpu_rdma: true,
        },
    ];

    fn local(src: StorageKind, dst: StorageKind, caps: Capabilities) -> Plan {
        select(Location::local(src), Location::local(dst), caps).unwrap()
    }

    fn two_hop(first: Strategy, second: Strategy) -> Plan {
        Plan::TwoHop {
            first,
            bounce: Pinned,
            second,
        }
    }

    fn assert_unsupported(r: Result<Plan>, needle: &str) {
        match r {
            Err(Error::Unsupported(m)) => assert!(m.contains(needle), "message {m:?}"),
            other => panic!("expected Unsupported containing {needle:?}, got {other:?}"),
        }
    }

    // The seed's test_host_to_host_transfers.
    #[test]
    fn host_to_host_is_memcpy() {
        for s in [System, Pinned] {
            for d in [System, Pinned] {
                assert_eq!(local(s, d, OFF), Plan::Direct(Memcpy));
            }
        }
    }

    // The seed's test_host_to_device_transfers and test_device_to_host_transfers.
    #[test]
    fn host_device_pairs() {
        assert_eq!(local(System, Device, OFF), Plan::Direct(CudaBlockingH2D));
        assert_eq!(local(Pinned, Device, OFF), Plan::Direct(CudaAsyncH2D));
        assert_eq!(local(Device, System, OFF), Plan::Direct(CudaBlockingD2H));
        assert_eq!(local(Device, Pinned, OFF), Plan::Direct(CudaAsyncD2H));
    }

    // The seed's test_device_to_device_transfers (device ids do not change the plan).
    #[test]
    fn device_to_device() {
        for caps in ALL_CAPS {
            assert_eq!(local(Device, Device, caps), Plan::Direct(CudaAsyncD2D));
        }
    }

    // The seed's test_disk_to_host_transfers and test_host_to_disk_transfers.
    #[test]
    fn host_disk_pairs() {
        for h in [System, Pinned] {
            assert_eq!(local(h, Disk, OFF), Plan::Direct(NixlWrite));
            assert_eq!(local(Disk, h, OFF), Plan::Direct(NixlReadFlipped));
        }
    }

    #[test]
    fn disk_to_disk_bounces_through_pinned() {
        for caps in ALL_CAPS {
            assert_eq!(local(Disk, Disk, caps), two_hop(NixlReadFlipped, NixlWrite));
        }
    }

    // The seed's test_device_to_disk_without_gds / test_disk_to_device_without_gds.
    #[test]
    fn device_disk_without_gds_bounces() {
        for caps in [OFF, RDMA] {
            assert_eq!(local(Device, Disk, caps), two_hop(CudaAsyncD2H, NixlWrite));
            assert_eq!(
                local(Disk, Device, caps),
                two_hop(NixlReadFlipped, CudaAsyncH2D)
            );
        }
    }

    // The seed's test_device_to_disk_with_gds / test_disk_to_device_with_gds.
    #[test]
    fn device_disk_with_gds_is_direct() {
        assert_eq!(local(Device, Disk, GDS), Plan::Direct(NixlWrite));
        assert_eq!(local(Disk, Device, GDS), Plan::Direct(NixlRead));
    }

    // Capabilities only change the Device↔Disk pairs.
    #[test]
    fn capabilities_change_only_device_disk() {
        for s in StorageKind::ALL {
            for d in StorageKind::ALL {
                if matches!((s, d), (Device, Disk) | (Disk, Device)) {
                    continue;
                }
                for caps in ALL_CAPS {
                    assert_eq!(local(s, d, caps), local(s, d, OFF), "{s} -> {d}");
                }
            }
        }
    }

    // The seed's test_host_to_remote.
    #[test]
    fn host_to_remote_writes_and_remote_to_host_reads_flipped() {
        for h in [System, Pinned] {
            for r in [System, Pinned] {
                for caps in ALL_CAPS {
                    let w = select(Location::local(h), Location::remote(r), caps);
                    assert_eq!(w.unwrap(), Plan::Direct(NixlWrite));
                    let rd = select(Location::remote(r), Location::local(h), caps);
                    assert_eq!(rd.unwrap(), Plan::Direct(NixlReadFlipped));
                }
            }
        }
    }

    // The seed's test_device_to_remote_without_rdma covers its unused v1 table (a two-hop
    // plan); the v2 rules the seed actually routes through refuse device memory without RDMA.
    #[test]
    fn device_remote_without_rdma_is_refused() {
        for caps in [OFF, GDS] {
            for other in [System, Pinned, Device] {
                let to = select(Location::local(Device), Location::remote(other), caps);
                assert_unsupported(to, "allow_gpu_rdma");
                let from = select(Location::remote(other), Location::local(Device), caps);
                assert_unsupported(from, "allow_gpu_rdma");
                let to_dev = select(Location::local(other), Location::remote(Device), caps);
                assert_unsupported(to_dev, "allow_gpu_rdma");
            }
        }
    }

    // The seed's test_device_to_remote_with_rdma, and the read direction of v2.
    #[test]
    fn device_remote_with_rdma_is_direct() {
        let w = select(Location::local(Device), Location::remote(Device), RDMA);
        assert_eq!(w.unwrap(), Plan::Direct(NixlWrite));
        let w = select(Location::local(Device), Location::remote(System), RDMA);
        assert_eq!(w.unwrap(), Plan::Direct(NixlWrite));
        let r = select(Location::remote(Pinned), Location::local(Device), RDMA);
        assert_eq!(r.unwrap(), Plan::Direct(NixlReadFlipped));
    }

    // The seed's test_disk_to_remote covers the v1 table (whose first hop is a write, a known
    // defect); v2 refuses disk on either side, local or remote, whatever the capabilities.
    #[test]
    fn disk_in_remote_transfer_is_refused() {
        for caps in ALL_CAPS {
            for other in StorageKind::ALL {
                for (s, d) in [
                    (Location::local(Disk), Location::remote(other)),
                    (Location::remote(other), Location::local(Disk)),
                    (Location::local(other), Location::remote(Disk)),
                    (Location::remote(Disk), Location::local(other)),
                ] {
                    assert_unsupported(select(s, d, caps), "disk");
                }
            }
        }
    }

    #[test]
    fn both_remote_is_refused_and_names_the_pair() {
        for s in StorageKind::ALL {
            for d in StorageKind::ALL {
                for caps in ALL_CAPS {
                    let r = select(Location::remote(s), Location::remote(d), caps);
                    assert_unsupported(r, &format!("remote {s} -> remote {d}"));
                }
            }
        }
    }

    #[test]
    fn every_local_pair_has_a_plan() {
        for s in StorageKind::ALL {
            for d in StorageKind::ALL {
                for caps in ALL_CAPS {
                    assert!(select(Location::local(s), Location::local(d), caps).is_ok());
                }
            }
        }
    }

    #[test]
    fn strategy_values_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(Strategy::try_from(s as i32).unwrap(), s);
        }
        assert!(Strategy::try_from(11).is_err());
        assert!(Strategy::try_from(-1).is_err());
    }
}
