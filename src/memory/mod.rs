//! Storage kinds and the memory behind a layout: allocations kvxfer owns (freed with the
//! layout) and caller-owned memory (never freed by kvxfer).

pub mod cuda;
pub mod disk;
mod host;
mod ipc;
mod remote;

pub use host::HostAllocation;
pub use ipc::{IpcFallback, LayoutIpc};
pub(crate) use ipc::{IpcImport, IpcPeer};
pub(crate) use remote::{DeviceCopier, DeviceStaging, Landing, RemoteUse, UseGuard};

use std::sync::{Arc, Mutex, OnceLock};

use nixl_sys::{MemType, RegistrationHandle};

use crate::cuda::CudaDevice;
use crate::error::{Error, Result, bail};
use crate::nixl::NixlRegion;
use cuda::{CudaAllocation, HostRegistration};
use disk::DiskFile;

/// Where the bytes of a layout live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageKind {
    /// Pageable host memory.
    System,
    /// Page-locked host memory.
    Pinned,
    /// CUDA device memory.
    Device,
    /// A file; addresses are file offsets.
    Disk,
}

impl StorageKind {
    pub const ALL: [StorageKind; 4] = [Self::System, Self::Pinned, Self::Device, Self::Disk];

    /// Host memory that the CPU can address directly.
    pub fn is_host(self) -> bool {
        matches!(self, Self::System | Self::Pinned)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::System => "System",
            Self::Pinned => "Pinned",
            Self::Device => "Device",
            Self::Disk => "Disk",
        }
    }
}

impl std::fmt::Display for StorageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<i32> for StorageKind {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self> {
        Ok(match v {
            0 => Self::System,
            1 => Self::Pinned,
            2 => Self::Device,
            3 => Self::Disk,
            _ => bail!(
                InvalidArgument,
                "unknown storage kind {v} (expected 0..=3: SYSTEM, PINNED, DEVICE, DISK)"
            ),
        })
    }
}

/// One contiguous span of a layout's memory: a host address, or a file offset for disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub addr: u64,
    pub len: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }

    pub fn overlaps(&self, other: &Region) -> bool {
        self.addr < other.end() && other.addr < self.end()
    }
}

/// Who frees the memory; the fields are held only to be dropped with the memory.
#[derive(Debug)]
#[allow(dead_code)]
enum Owner {
    /// kvxfer mapped it; dropping the allocations unmaps it.
    Host(Vec<HostAllocation>),
    /// kvxfer allocated it through CUDA.
    Cuda(Vec<CudaAllocation>),
    /// The caller owns it and keeps it alive at least as long as the layout; kvxfer may have
    /// registered parts of it with CUDA, undone on drop.
    Caller(Vec<HostRegistration>),
    /// A peer's memory: addresses in another process, never touched here; usable until the
    /// peer revokes it.
    Remote(Arc<RemoteUse>),
    /// A same-host peer's device memory mapped here through CUDA IPC for one transfer; the
    /// use keeps the mapping open (and the peer's revocation waiting) until it is dropped.
    Mapped(UseGuard),
    /// A file; regions are offsets in it.
    Disk(DiskFile),
}

/// The memory of one layout: one region (fully contiguous) or one per layer.
#[derive(Debug)]
pub struct Memory {
    kind: StorageKind,
    device_id: i32,
    regions: Vec<Region>,
    /// The CUDA device that owns or can reach it, when there is one.
    device: Option<Arc<CudaDevice>>,
    /// Host memory a kernel can read and write through the device mapping.
    mapped: bool,
    /// NIXL registrations, made when a NIXL path first needs them; dropped (deregistered)
    /// before the memory itself is released, hence declared before `owner`.
    nixl: Mutex<Vec<RegistrationHandle>>,
    /// Device memory: its CUDA IPC handles for same-host peers, or why there are none; made on
    /// the first export.
    ipc_export: OnceLock<std::result::Result<LayoutIpc, String>>,
    owner: Owner,
}

impl Memory {
    /// Allocates one host region per entry of `sizes`, each aligned to `alignment` (at least a
    /// page) and zeroed; `Pinned` memory is page-locked.
    pub fn allocate_host(kind: StorageKind, sizes: &[u64], alignment: u64) -> Result<Self> {
        if !kind.is_host() {
            bail!(InvalidArgument, "{kind} is not host memory");
        }
        let lock = kind == StorageKind::Pinned;
        let total = sizes.iter().try_fold(0u64, |a, &s| a.checked_add(s));
        host::check_available(total.unwrap_or(u64::MAX))?;
        let allocations = sizes
            .iter()
            .map(|&size| HostAllocation::new(size, alignment, lock))
            .collect::<Result<Vec<_>>>()?;
        let regions = allocations.iter().map(HostAllocation::region).collect();
        Ok(Self {
            kind,
            device_id: 0,
            regions,
            device: None,
            mapped: false,
            nixl: Mutex::default(),
            ipc_export: OnceLock::new(),
            owner: Owner::Host(allocations),
        })
    }

    /// Page-locked host memory: CUDA-pinned (portable, device-mapped) when there is a device to
    /// pin it for, else `mmap` + `mlock`.
    pub fn allocate_pinned(
        dev: Option<&Arc<CudaDevice>>,
        sizes: &[u64],
        alignment: u64,
    ) -> Result<Self> {
        match dev {
            Some(d) => Self::allocate_cuda(d, StorageKind::Pinned, sizes, alignment),
            None => Self::allocate_host(StorageKind::Pinned, sizes, alignment),
        }
    }

    /// Pinned (`Pinned`, portable and device-mapped) or device (`Device`) memory from CUDA.
    pub fn allocate_cuda(
        dev: &Arc<CudaDevice>,
        kind: StorageKind,
        sizes: &[u64],
        alignment: u64,
    ) -> Result<Self> {
        let allocations = sizes
            .iter()
            .map(|&size| match kind {
                StorageKind::Pinned => CudaAllocation::pinned(dev, size, alignment),
                StorageKind::Device => CudaAllocation::device(dev, size, alignment),
                _ => Err(Error::InvalidArgument(format!("{kind} is not CUDA memory"))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kind,
            device_id: dev.ordinal,
            regions: allocations.iter().map(CudaAllocation::region).collect(),
            device: Some(dev.clone()),
            mapped: kind == StorageKind::Pinned,
            nixl: Mutex::default(),
            ipc_export: OnceLock::new(),
            owner: Owner::Cuda(allocations),
        })
    }

    /// Describes memory the caller owns. The caller guarantees it stays valid while any layout
    /// or transfer uses it.
    pub fn caller_owned(kind: StorageKind, device_id: i32, regions: Vec<Region>) -> Self {
        Self {
            kind,
            device_id,
            regions,
            device: None,
            mapped: false,
            nixl: Mutex::default(),
            ipc_export: OnceLock::new(),
            owner: Owner::Caller(Vec::new()),
        }
    }

    /// A peer's memory, described by its export. It is never read or written locally;
    /// transfers use it through `begin_remote_use` until the peer revokes it.
    pub(crate) fn remote(
        kind: StorageKind,
        device_id: i32,
        regions: Vec<Region>,
        state: Arc<RemoteUse>,
    ) -> Self {
        Self {
            owner: Owner::Remote(state),
            ..Self::caller_owned(kind, device_id, regions)
        }
    }

    /// A transfer starts using a peer's memory (`Error::Peer` once the peer revoked it); `None`
    /// for local memory.
    pub(crate) fn begin_remote_use(&self) -> Result<Option<UseGuard>> {
        match &self.owner {
            Owner::Remote(state) => state.begin().map(Some),
            _ => Ok(None),
        }
    }

    /// A disk layout's memory: `allocations` regions of `len` bytes at offsets aligned for
    /// O_DIRECT and GDS (`DIRECT_ALIGN`) of a file at `path` (created or reused, kept) or of a
    /// new unnamed one in `dir` (`named`: one that can be opened again by name, as cuFile
    /// does).
    pub fn allocate_disk(
        len: u64,
        allocations: u64,
        path: Option<&std::path::Path>,
        dir: &std::path::Path,
        named: bool,
    ) -> Result<Self> {
        let too_large = || Error::InvalidArgument("disk layout too large".into());
        let stride = len
            .checked_next_multiple_of(disk::DIRECT_ALIGN)
            .ok_or_else(too_large)?;
        let total = stride.checked_mul(allocations).ok_or_else(too_large)?;
        let file = match path {
            Some(p) => DiskFile::at(p, total)?,
            None => DiskFile::temporary(dir, total, named)?,
        };
        let regions = (0..allocations)
            .map(|i| Region {
                addr: i * stride,
                len,
            })
            .collect();
        Ok(Self::disk(file, regions))
    }

    /// A disk layout's memory: one region per allocation at page-aligned offsets of `file`.
    pub fn disk(file: DiskFile, regions: Vec<Region>) -> Self {
        Self {
            kind: StorageKind::Disk,
            device_id: file.fd(),
            regions,
            device: None,
            mapped: false,
            nixl: Mutex::default(),
            ipc_export: OnceLock::new(),
            owner: Owner::Disk(file),
        }
    }

    /// The file of a disk layout.
    pub fn disk_file(&self) -> Option<&DiskFile> {
        match &self.owner {
            Owner::Disk(f) => Some(f),
            _ => None,
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self.owner, Owner::Remote(_))
    }

    /// A peer's device memory, mapped here through CUDA IPC at `regions` (its addresses in
    /// this process) on `dev`, for as long as `using` lasts.
    pub(crate) fn ipc_mapped(dev: &Arc<CudaDevice>, regions: Vec<Region>, using: UseGuard) -> Self {
        Self {
            device: Some(dev.clone()),
            owner: Owner::Mapped(using),
            ..Self::caller_owned(StorageKind::Device, dev.ordinal, regions)
        }
    }

    /// A peer layout's landing arena (this importer's slots in it) and its export id there.
    pub(crate) fn landing(&self) -> Option<(&Arc<dyn Landing>, u64)> {
        match &self.owner {
            Owner::Remote(state) => state.landing(),
            _ => None,
        }
    }

    /// A peer layout's CUDA IPC handles as this importer sees them.
    pub(crate) fn ipc(&self) -> Option<&Arc<IpcImport>> {
        match &self.owner {
            Owner::Remote(state) => state.ipc(),
            _ => None,
        }
    }

    /// CUDA IPC handles of this device memory for a same-host peer (made once), or why it
    /// has none.
    pub(crate) fn ipc_export(&self) -> std::result::Result<&LayoutIpc, &str> {
        self.ipc_export
            .get_or_init(|| match (&self.owner, self.kind, &self.device) {
                (Owner::Cuda(_) | Owner::Caller(_), StorageKind::Device, Some(dev)) => {
                    LayoutIpc::export(dev, &self.regions).map_err(|e| {
                        tracing::info!(
                            "device memory at {:#x} cannot be shared through CUDA IPC ({e}); \
                             same-host peers reach it through NIXL",
                            self.regions.first().map_or(0, |r| r.addr)
                        );
                        e.to_string()
                    })
                }
                _ => Err("only local device memory is shared through CUDA IPC".into()),
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// Registers every region with `agent` unless that was done already; the registrations
    /// last as long as the memory.
    pub fn ensure_nixl_registered(&self, agent: &nixl_sys::Agent) -> Result<()> {
        self.ensure_nixl_registered_with(agent, || Ok(None))
    }

    /// As `ensure_nixl_registered`; a disk file's buffered descriptor is registered with the
    /// backends `buffered` gives where it gives some (asked only when registering), its O_DIRECT
    /// descriptor with every backend.
    pub fn ensure_nixl_registered_with(
        &self,
        agent: &nixl_sys::Agent,
        buffered: impl FnOnce() -> Result<Option<nixl_sys::OptArgs>>,
    ) -> Result<()> {
        let mut regs = self.nixl.lock().unwrap_or_else(|p| p.into_inner());
        if !regs.is_empty() {
            return Ok(());
        }
        let (mem, device) = self.nixl_type();
        // A disk file is registered under both of its descriptors (buffered and O_DIRECT).
        let devices: Vec<u64> = std::iter::once(device)
            .chain(
                self.disk_file()
                    .and_then(|f| f.direct_fd())
                    .map(|fd| fd as u64),
            )
            .collect();
        let buffered = if self.kind == StorageKind::Disk {
            buffered()?
        } else {
            None
        };
        let spans = self.nixl_spans();
        let mut made = Vec::with_capacity(spans.len() * devices.len());
        for (r, device) in spans
            .iter()
            .flat_map(|r| devices.iter().map(move |&d| (r, d)))
        {
            let d = NixlRegion {
                addr: r.addr,
                len: r.len,
                mem,
                device,
            };
            let args = if device == devices[0] {
                buffered.as_ref()
            } else {
                None
            };
            let h = agent.register_memory(&d, args).map_err(|e| {
                Error::Nixl(format!(
                    "NIXL could not register {} bytes of {} memory at {:#x}: {e}",
                    r.len, self.kind, r.addr
                ))
            })?;
            made.push(h);
        }
        *regs = made;
        Ok(())
    }

    /// NIXL's memory type of this memory and its device id (a device ordinal, or the file
    /// descriptor of a disk file's buffered descriptor).
    pub(crate) fn nixl_type(&self) -> (MemType, u64) {
        match self.kind {
            StorageKind::Device => (MemType::Vram, self.device_id.max(0) as u64),
            StorageKind::Disk => (MemType::File, self.device_id.max(0) as u64),
            _ => (MemType::Dram, 0),
        }
    }

    /// The spans registered with NIXL (by this process for local memory, by the peer for a
    /// peer's): one per region, but one for a whole disk file, whose offsets are one address
    /// space. A NIXL descriptor must lie inside one span.
    pub(crate) fn nixl_spans(&self) -> Vec<Region> {
        if self.kind != StorageKind::Disk || self.regions.is_empty() {
            return self.regions.clone();
        }
        let start = self.regions.iter().map(|r| r.addr).min().unwrap_or(0);
        let end = self.regions.iter().map(Region::end).max().unwrap_or(0);
        vec![Region {
            addr: start,
            len: end - start,
        }]
    }

    /// Caller memory on a CUDA context: device memory is checked to lie in allocations of
    /// `dev`; pinned host memory is registered with CUDA unless it already is, so kernels can
    /// reach it.
    pub fn caller_owned_cuda(
        dev: &Arc<CudaDevice>,
        kind: StorageKind,
        regions: Vec<Region>,
    ) -> Result<Self> {
        let mut registrations = Vec::new();
        match kind {
            StorageKind::Device => {
                for r in &regions {
                    dev.check_device_range(r.addr, r.len)?;
                }
            }
            StorageKind::Pinned => {
                for r in &regions {
                    if r.addr != 0 && r.len > 0 {
                        registrations.extend(HostRegistration::ensure(dev, r.addr, r.len)?);
                    }
                }
            }
            _ => {}
        }
        Ok(Self {
            kind,
            device_id: dev.ordinal,
            regions,
            device: Some(dev.clone()),
            mapped: kind == StorageKind::Pinned,
            nixl: Mutex::default(),
            ipc_export: OnceLock::new(),
            owner: Owner::Caller(registrations),
        })
    }

    pub fn device(&self) -> Option<&Arc<CudaDevice>> {
        self.device.as_ref()
    }

    /// Host memory the device can read and write directly (pinned through CUDA).
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    pub fn kind(&self) -> StorageKind {
        self.kind
    }

    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Whether any byte of `self` can also be reached through `other`.
    pub fn may_alias(&self, other: &Memory) -> bool {
        if std::ptr::eq(self, other) {
            return true;
        }
        if self.is_remote() || other.is_remote() {
            return false; // another address space
        }
        let same_space = match (self.kind, other.kind) {
            (a, b) if a.is_host() && b.is_host() => true,
            (StorageKind::Device, StorageKind::Device) => self.device_id == other.device_id,
            _ => false,
        };
        same_space
            && self
                .regions
                .iter()
                .any(|a| other.regions.iter().any(|b| a.overlaps(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn more_than_available_memory_is_refused_not_attempted() {
        let e = Memory::allocate_host(StorageKind::System, &[1 << 50], 4096).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(m) if m.contains("available")));
        // Many allocations that fit one by one but not together.
        let e = Memory::allocate_host(StorageKind::Pinned, &[1 << 45; 64], 4096).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)));
    }

    #[test]
    fn host_memory_is_aligned_zeroed_and_writable() {
        let m = Memory::allocate_host(StorageKind::Pinned, &[3 << 20, 4096], 1 << 16).unwrap();
        for r in m.regions() {
            assert_eq!(r.addr % (1 << 16), 0);
            // SAFETY: the region is live memory owned by `m`.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, r.len as usize) };
            assert!(bytes.iter().all(|&b| b == 0));
            bytes.fill(0xab);
        }
    }
}
