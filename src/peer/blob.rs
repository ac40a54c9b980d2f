//! The bytes one context exports for a peer: its NIXL agent's metadata and descriptors of the
//! layouts it shares. The peer's bytes are untrusted: `decode` checks the magic, version, length
//! and checksum first (so corrupted input never reaches NIXL's own parser), then every field.
//!
//! With a deployment's peer key (`PeerKey`), the export ends in a keyed BLAKE3 MAC of every byte
//! before it, flags bit 0 says so, and an importer with the key checks it before anything else:
//! a blob not made with the same key never reaches NIXL. The xxh3 checksum only catches
//! corruption; anyone can recompute it.
//!
//! Format, little-endian:
//! ```text
//! magic "KVXPEER\0" | version u16 | flags u16 (bit 0: MAC) | total length u32 |
//! xxh3-64 of the body | body | with flag bit 0: keyed BLAKE3 of everything before, 32 bytes
//! body:
//! agent name: u16 length + UTF-8 | NIXL metadata: u32 length + bytes |
//!   (version 4) host boot id: 16 bytes (zero: unknown) | pid u32 | process start time u64 |
//!     landing arena in host memory: address u64, slot bytes u64, slots u32 (0: none) |
//!   (version 5) landing arena in device memory: address u64, slot bytes u64, slots u32
//!     (0: none), device id i32 |
//! layout count u32
//! per layout: export id u64 | num_blocks, num_layers, outer_dim, page_size, inner_dim: u64 |
//!   dtype_width, alignment, layout kind, storage kind: u32 | device id i32 |
//!   (version 3) num_heads, head_begin, head_order: u32 |
//!   region count u32 | per region: address u64, length u64 |
//!   (version 4) IPC allocation count u32 (0: none) | with any: GPU UUID 16 bytes |
//!     per allocation: CUDA IPC handle 64 bytes, base u64, length u64
//! ```
//! Version 2 (no heads: every layout opaque), 3 (no CUDA IPC: same-host peers use NIXL) and 4
//! (no device arena: small device pieces go one by one) exports still import.

use xxhash_rust::xxh3::xxh3_64;

use crate::cuda::{IpcHandle, ProcessId};
use crate::error::{Error, Result, bail};
use crate::layout::{HeadOrder, Heads, LayoutConfig, LayoutKind, check_regions};
use crate::memory::{LayoutIpc, Region, StorageKind};

const MAGIC: &[u8; 8] = b"KVXPEER\0";
/// 2: each layout carries its export id (revocation); 3: and the heads its regions hold (head
/// transforms); 4: the exporter's host and process, CUDA IPC handles of device layouts and a
/// landing arena in host memory; 5: a landing arena in device memory. Versions 2 to 4 still
/// import; version 1 exports are refused with a message that names the versions read.
const VERSION: u16 = 5;
const OLDEST: u16 = 2;
/// Flag: the export ends in a MAC made with a peer key.
const FLAG_MAC: u16 = 1;
pub(crate) const MAC_LEN: usize = blake3::OUT_LEN;
/// Shortest peer key: 128 bits.
pub(crate) const PEER_KEY_MIN_LEN: usize = 16;

/// A deployment's shared secret for authenticating peer exports, made into a BLAKE3 key. Every
/// context of a deployment gets the same secret; exports then carry a MAC that only holders of
/// the secret can make, and imports refuse any other.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerKey([u8; 32]);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    /// A key from `secret`, at least PEER_KEY_MIN_LEN bytes (`InvalidArgument` otherwise).
    pub fn new(secret: &[u8]) -> Result<Self> {
        if secret.len() < PEER_KEY_MIN_LEN {
            bail!(
                InvalidArgument,
                "peer_key must be at least {PEER_KEY_MIN_LEN} bytes, got {}",
                secret.len()
            );
        }
        Ok(Self(blake3::derive_key(
            "kvxfer peer export MAC, version 1",
            secret,
        )))
    }

    fn mac(&self, data: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.0, data)
    }

    /// The MAC of a control message: `parts` in order, after a domain tag so that no control
    /// message can pass for an export or the other way round.
    pub(crate) fn mac_parts(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"kvxfer control message\0");
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        *h.finalize().as_bytes()
    }

    /// Whether `tag` is the MAC of `parts`, compared in constant time.
    pub(crate) fn verify_parts(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let Ok(tag) = <[u8; MAC_LEN]>::try_from(tag) else {
            return false;
        };
        blake3::Hash::from_bytes(self.mac_parts(parts)) == blake3::Hash::from_bytes(tag)
    }
}
const HEADER: usize = 8 + 2 + 2 + 4 + 8;
/// Bounds that keep a hostile blob from asking for absurd allocations.
const MAX_LAYOUTS: u32 = 4096;
const MAX_MD: u32 = 64 << 20;
/// More IPC allocations than a layout has regions cannot be needed.
const MAX_IPC_ALLOCATIONS: u32 = 1 << 16;

/// One shared layout as a peer sees it: addresses are in the exporter's address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutDescriptor {
    /// The exporter's name for this layout in control messages (revocation).
    pub export_id: u64,
    pub config: LayoutConfig,
    pub kind: StorageKind,
    pub device_id: i32,
    pub regions: Vec<Region>,
    /// Device layouts: CUDA IPC handles of the allocations holding `regions` (version 4).
    pub ipc: Option<LayoutIpc>,
}

/// The exporter's landing arena (version 4): `slots` slots of `slot_bytes` from `addr`,
/// registered with its agent; importers are granted slots of it (`landing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaDesc {
    pub addr: u64,
    pub slot_bytes: u64,
    pub slots: u32,
}

impl ArenaDesc {
    /// What the blob carries for no arena.
    const NONE: Self = Self {
        addr: 0,
        slot_bytes: 0,
        slots: 0,
    };

    fn put(&self, body: &mut Vec<u8>) {
        body.extend_from_slice(&self.addr.to_le_bytes());
        body.extend_from_slice(&self.slot_bytes.to_le_bytes());
        body.extend_from_slice(&self.slots.to_le_bytes());
    }
}

/// Bounds on an announced arena.
const MAX_ARENA_SLOTS: u32 = 256;
const MAX_SLOT_BYTES: u64 = 256 << 20;

/// Where the exporter runs, for same-host shortcuts (version 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Origin {
    /// The host's boot id (`None`: unknown, never the same host).
    pub host: Option<[u8; 16]>,
    /// The exporting process.
    pub process: ProcessId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBlob {
    pub agent: String,
    pub nixl_md: Vec<u8>,
    pub origin: Origin,
    /// The exporter's landing arena, if it has one (version 4).
    pub arena: Option<ArenaDesc>,
    /// Its landing arena in device memory, and that device's id (version 5).
    pub device_arena: Option<(ArenaDesc, i32)>,
    pub layouts: Vec<LayoutDescriptor>,
}

fn order_code(o: HeadOrder) -> u32 {
    match o {
        HeadOrder::TokenMajor => 0,
        HeadOrder::HeadMajor => 1,
    }
}

fn kind_code(k: LayoutKind) -> u32 {
    match k {
        LayoutKind::FullyContiguous => 0,
        LayoutKind::LayerSeparateBlockFirst => 1,
        LayoutKind::LayerSeparateOuterFirst => 2,
    }
}

impl PeerBlob {
    /// The export's bytes; with `key`, authenticated by it.
    pub fn encode(&self, key: Option<&PeerKey>) -> Result<Vec<u8>> {
        seal_as(&self.body(VERSION)?, key, VERSION)
    }

    /// The body in format `version` (2: without heads).
    fn body(&self, version: u16) -> Result<Vec<u8>> {
        let name = self.agent.as_bytes();
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            bail!(InvalidArgument, "agent name must be 1 to 65535 bytes");
        }
        let mut body = Vec::new();
        body.extend_from_slice(&(name.len() as u16).to_le_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&(self.nixl_md.len() as u32).to_le_bytes());
        body.extend_from_slice(&self.nixl_md);
        if version >= 4 {
            body.extend_from_slice(&self.origin.host.unwrap_or_default());
            body.extend_from_slice(&self.origin.process.pid.to_le_bytes());
            body.extend_from_slice(&self.origin.process.start.to_le_bytes());
            self.arena.unwrap_or(ArenaDesc::NONE).put(&mut body);
        }
        if version >= 5 {
            let (a, dev) = self.device_arena.unwrap_or((ArenaDesc::NONE, 0));
            a.put(&mut body);
            body.extend_from_slice(&dev.to_le_bytes());
        }
        body.extend_from_slice(&(self.layouts.len() as u32).to_le_bytes());
        for l in &self.layouts {
            let c = &l.config;
            body.extend_from_slice(&l.export_id.to_le_bytes());
            for v in [
                c.num_blocks,
                c.num_layers,
                c.outer_dim,
                c.page_size,
                c.inner_dim,
            ] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            for v in [c.dtype_width, c.alignment, kind_code(c.kind), l.kind as u32] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&l.device_id.to_le_bytes());
            if version >= 3 {
                let h = c.heads;
                for v in [h.num_heads, h.head_begin, order_code(h.order)] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
            }
            body.extend_from_slice(&(l.regions.len() as u32).to_le_bytes());
            for r in &l.regions {
                body.extend_from_slice(&r.addr.to_le_bytes());
                body.extend_from_slice(&r.len.to_le_bytes());
            }
            if version >= 4 {
                let allocations = l.ipc.as_ref().map_or(&[][..], |i| &i.allocations[..]);
                body.extend_from_slice(&(allocations.len() as u32).to_le_bytes());
                if let Some(i) = l.ipc.as_ref().filter(|i| !i.allocations.is_empty()) {
                    body.extend_from_slice(&i.gpu);
                    for a in &i.allocations {
                        body.extend_from_slice(&a.handle);
                        body.extend_from_slice(&a.base.to_le_bytes());
                        body.extend_from_slice(&a.len.to_le_bytes());
                    }
                }
            }
        }
        Ok(body)
    }

    /// Parses untrusted bytes; anything malformed is `Error::Peer`. With `key`, only an export
    /// made with the same key is read past its header (the MAC is checked first); without,
    /// only an export without a MAC.
    pub fn decode(data: &[u8], key: Option<&PeerKey>) -> Result<Self> {
        if data.len() < HEADER || &data[..8] != MAGIC {
            bail!(Peer, "not a kvxfer peer export (bad magic or too short)");
        }
        let mut r = Reader {
            data,
            pos: 8,
            version: 0,
        };
        let version = r.u16()?;
        if !(OLDEST..=VERSION).contains(&version) {
            bail!(
                Peer,
                "peer export version {version}, this kvxfer reads versions {OLDEST} to {VERSION}"
            );
        }
        let flags = r.u16()?;
        if flags & !FLAG_MAC != 0 {
            bail!(
                Peer,
                "peer export uses flags {flags:#x} this kvxfer does not know"
            );
        }
        let total = r.u32()? as usize;
        if total != data.len() {
            bail!(
                Peer,
                "peer export says {total} bytes but {} were given",
                data.len()
            );
        }
        let end = match (key, flags & FLAG_MAC != 0) {
            (Some(key), true) => {
                let Some(signed) = data.len().checked_sub(MAC_LEN).filter(|&n| n >= HEADER) else {
                    bail!(Peer, "peer export is too short for its MAC");
                };
                let tag: [u8; MAC_LEN] = data[signed..]
                    .try_into()
                    .map_err(|_| Error::Peer("peer export MAC is cut off".into()))?;
                // blake3::Hash compares in constant time.
                if key.mac(&data[..signed]) != blake3::Hash::from_bytes(tag) {
                    bail!(
                        Peer,
                        "peer export was not made with this deployment's peer_key (MAC mismatch)"
                    );
                }
                signed
            }
            (Some(_), false) => bail!(
                Peer,
                "peer export is not authenticated, but this context has a peer_key: give the \
                 exporting context the same peer_key"
            ),
            (None, true) => bail!(
                Peer,
                "peer export is authenticated with a peer_key, but this context has none: give \
                 it the deployment's peer_key"
            ),
            (None, false) => data.len(),
        };
        // The fields end where the MAC begins.
        let data = &data[..end];
        let mut r = Reader {
            data,
            pos: r.pos,
            version,
        };
        let sum = r.u64()?;
        if xxh3_64(&data[HEADER..]) != sum {
            bail!(Peer, "peer export is corrupted (checksum mismatch)");
        }
        let name_len = usize::from(r.u16()?);
        let agent = std::str::from_utf8(r.bytes(name_len)?)
            .map_err(|_| Error::Peer("peer agent name is not UTF-8".into()))?
            .to_string();
        if agent.is_empty() {
            bail!(Peer, "peer agent name is empty");
        }
        let md_len = r.u32()?;
        if md_len > MAX_MD {
            bail!(Peer, "peer NIXL metadata of {md_len} bytes is too large");
        }
        let nixl_md = r.bytes(md_len as usize)?.to_vec();
        let origin = if version >= 4 {
            let host: [u8; 16] = r.array()?;
            Origin {
                host: (host != [0; 16]).then_some(host),
                process: ProcessId {
                    pid: r.u32()?,
                    start: r.u64()?,
                },
            }
        } else {
            Origin::default()
        };
        let arena = if version >= 4 { r.arena()? } else { None };
        let device_arena = if version >= 5 {
            let a = r.arena()?;
            let dev = r.i32()?;
            if dev < 0 {
                bail!(Peer, "peer announces a device arena on device {dev}");
            }
            a.map(|a| (a, dev))
        } else {
            None
        };
        let count = r.u32()?;
        if count > MAX_LAYOUTS {
            bail!(Peer, "peer shares {count} layouts, more than {MAX_LAYOUTS}");
        }
        let mut layouts = Vec::new();
        for i in 0..count {
            layouts.push(
                r.layout()
                    .map_err(|e| Error::Peer(format!("peer layout {i}: {e}")))?,
            );
        }
        if r.pos != data.len() {
            bail!(
                Peer,
                "{} unexpected bytes after the peer's layouts",
                data.len() - r.pos
            );
        }
        Ok(Self {
            agent,
            nixl_md,
            origin,
            arena,
            device_arena,
            layouts,
        })
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// The export's format version (fields differ by version).
    version: u16,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| Error::Peer("peer export is truncated".into()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    /// A landing arena: none (no slots), or one within bounds.
    fn arena(&mut self) -> Result<Option<ArenaDesc>> {
        let (addr, slot_bytes, slots) = (self.u64()?, self.u64()?, self.u32()?);
        match slots {
            0 => Ok(None),
            n if n > MAX_ARENA_SLOTS
                || slot_bytes == 0
                || slot_bytes > MAX_SLOT_BYTES
                || addr == 0
                || addr.checked_add(slot_bytes * u64::from(n)).is_none() =>
            {
                bail!(Peer, "peer announces a landing arena out of bounds")
            }
            _ => Ok(Some(ArenaDesc {
                addr,
                slot_bytes,
                slots,
            })),
        }
    }

    fn layout(&mut self) -> Result<LayoutDescriptor> {
        let export_id = self.u64()?;
        let (num_blocks, num_layers, outer_dim, page_size, inner_dim) = (
            self.u64()?,
            self.u64()?,
            self.u64()?,
            self.u64()?,
            self.u64()?,
        );
        let (dtype_width, alignment) = (self.u32()?, self.u32()?);
        let kind = LayoutKind::try_from(self.u32()? as i32)?;
        let storage = StorageKind::try_from(self.u32()? as i32)?;
        let device_id = i32::from_le_bytes(self.array()?);
        let heads = if self.version >= 3 {
            Heads {
                num_heads: self.u32()?,
                head_begin: self.u32()?,
                order: HeadOrder::try_from(self.u32()? as i32)?,
            }
        } else {
            Heads::OPAQUE
        };
        if storage == StorageKind::Disk {
            bail!(Peer, "disk layouts cannot be shared with peers");
        }
        let config = LayoutConfig {
            num_blocks,
            num_layers,
            outer_dim,
            page_size,
            inner_dim,
            dtype_width,
            alignment,
            kind,
            heads,
        };
        let geometry = config.validate()?;
        let n = self.u32()?;
        if u64::from(n) != geometry.allocations {
            bail!(
                Peer,
                "{n} regions for a layout of {} allocations",
                geometry.allocations
            );
        }
        let mut regions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            regions.push(Region {
                addr: self.u64()?,
                len: self.u64()?,
            });
        }
        check_regions(&config, storage, &regions)?;
        let ipc = if self.version >= 4 {
            self.ipc(storage, &regions)?
        } else {
            None
        };
        Ok(LayoutDescriptor {
            export_id,
            config,
            kind: storage,
            device_id,
            regions,
            ipc,
        })
    }

    /// A layout's IPC allocations: only device layouts have them, and they must hold every
    /// region (an importer translates addresses by them).
    fn ipc(&mut self, storage: StorageKind, regions: &[Region]) -> Result<Option<LayoutIpc>> {
        let n = self.u32()?;
        if n == 0 {
            return Ok(None);
        }
        if storage != StorageKind::Device {
            bail!(Peer, "IPC handles for {storage} memory");
        }
        if n > MAX_IPC_ALLOCATIONS {
            bail!(Peer, "{n} IPC allocations, more than {MAX_IPC_ALLOCATIONS}");
        }
        let gpu = self.array()?;
        let mut allocations = Vec::with_capacity(n as usize);
        for _ in 0..n {
            allocations.push(IpcHandle {
                handle: self.array()?,
                base: self.u64()?,
                len: self.u64()?,
            });
        }
        let ipc = LayoutIpc { gpu, allocations };
        if !ipc.covers(regions) {
            bail!(Peer, "the IPC allocations do not hold the layout's regions");
        }
        Ok(Some(ipc))
    }
}

/// `body` behind the header (magic, version, flags, total length, checksum of the body) and,
/// with `key`, followed by the MAC of all that.
#[cfg(feature = "fuzzing")]
pub(crate) fn seal(body: &[u8], key: Option<&PeerKey>) -> Result<Vec<u8>> {
    seal_as(body, key, VERSION)
}

/// As `seal`, in format `version`.
fn seal_as(body: &[u8], key: Option<&PeerKey>, version: u16) -> Result<Vec<u8>> {
    let mac_len = if key.is_some() { MAC_LEN } else { 0 };
    let total = u32::try_from(HEADER + body.len() + mac_len)
        .map_err(|_| Error::InvalidArgument("export is larger than 4 GiB".into()))?;
    let flags = if key.is_some() { FLAG_MAC } else { 0 };
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&xxh3_64(body).to_le_bytes());
    out.extend_from_slice(body);
    if let Some(key) = key {
        let tag = key.mac(&out);
        out.extend_from_slice(tag.as_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> PeerBlob {
        let c = LayoutConfig {
            num_blocks: 8,
            num_layers: 2,
            outer_dim: 2,
            page_size: 16,
            inner_dim: 64,
            dtype_width: 2,
            alignment: 256,
            kind: LayoutKind::LayerSeparateOuterFirst,
            heads: Default::default(),
        };
        let len = c.validate().unwrap().allocation_len;
        PeerBlob {
            agent: "decode-3".into(),
            nixl_md: (0..200u8).collect(),
            origin: Origin {
                host: Some([9; 16]),
                process: ProcessId {
                    pid: 4321,
                    start: 0xfeed,
                },
            },
            arena: Some(ArenaDesc {
                addr: 0x6000_0000,
                slot_bytes: 8 << 20,
                slots: 8,
            }),
            device_arena: Some((
                ArenaDesc {
                    addr: 0x7e00_0000_0000,
                    slot_bytes: 4 << 20,
                    slots: 16,
                },
                1,
            )),
            layouts: vec![
                LayoutDescriptor {
                    export_id: 0x1234,
                    config: c,
                    kind: StorageKind::Device,
                    device_id: 1,
                    regions: vec![
                        Region {
                            addr: 0x7f00_0000_0000,
                            len,
                        },
                        Region {
                            addr: 0x7f00_1000_0000,
                            len,
                        },
                    ],
                    ipc: Some(LayoutIpc {
                        gpu: [3; 16],
                        allocations: vec![IpcHandle {
                            handle: [5; crate::cuda::HANDLE_LEN],
                            base: 0x7f00_0000_0000,
                            len: 0x2000_0000,
                        }],
                    }),
                },
                LayoutDescriptor {
                    export_id: u64::MAX,
                    config: LayoutConfig {
                        kind: LayoutKind::FullyContiguous,
                        ..c
                    },
                    kind: StorageKind::Pinned,
                    device_id: 0,
                    regions: vec![Region {
                        addr: 0x5000_0000,
                        len: 2 * len,
                    }],
                    ipc: None,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let b = blob();
        assert_eq!(PeerBlob::decode(&b.encode(None).unwrap(), None).unwrap(), b);
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let bytes = blob().encode(None).unwrap();
        for n in 0..bytes.len() {
            assert!(
                matches!(PeerBlob::decode(&bytes[..n], None), Err(Error::Peer(_))),
                "length {n}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            PeerBlob::decode(&longer, None),
            Err(Error::Peer(_))
        ));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = blob().encode(None).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(PeerBlob::decode(&b, None).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    /// A well-formed envelope (right checksum) around hostile fields is still refused.
    #[test]
    fn hostile_fields_with_a_valid_checksum_are_refused() {
        let reseal = |mut b: Vec<u8>| {
            let sum = xxh3_64(&b[HEADER..]);
            b[16..24].copy_from_slice(&sum.to_le_bytes());
            b
        };
        let good = blob().encode(None).unwrap();
        let name_len_at = HEADER;
        let md_len_at = HEADER + 2 + 8;
        let count_at = md_len_at + 4 + 200 + 16 + 4 + 8 + 20 + 24;
        let arena_at = count_at - 44;
        let device_arena_at = count_at - 24;
        // Past the first layout's export id.
        let first_layout = count_at + 4 + 8;
        // The first layout's IPC count (after two regions), the second's (after one).
        let ipc_at = first_layout + 72 + 4 + 32;
        let second_ipc_at = ipc_at + 4 + 16 + 80 + 8 + 72 + 4 + 16;
        let cases: Vec<(usize, Vec<u8>)> = vec![
            (name_len_at, 0u16.to_le_bytes().to_vec()), // empty name
            (name_len_at, 60000u16.to_le_bytes().to_vec()), // name past the end
            (md_len_at, u32::MAX.to_le_bytes().to_vec()), // huge metadata
            (count_at, u32::MAX.to_le_bytes().to_vec()), // huge layout count
            (count_at, 3u32.to_le_bytes().to_vec()),    // more layouts than present
            (first_layout, 0u64.to_le_bytes().to_vec()), // num_blocks 0
            (first_layout + 8, u64::MAX.to_le_bytes().to_vec()), // overflowing layers
            (first_layout + 40, 3u32.to_le_bytes().to_vec()), // dtype 3
            (first_layout + 48, 9u32.to_le_bytes().to_vec()), // layout kind 9
            (first_layout + 52, 3u32.to_le_bytes().to_vec()), // disk
            (first_layout + 60, 3u32.to_le_bytes().to_vec()), // 3 heads in inner_dim 64
            (first_layout + 60, 2u32.to_le_bytes().to_vec()), // 2 heads from u32::MAX (below)
            (first_layout + 68, 7u32.to_le_bytes().to_vec()), // head order 7
            (first_layout + 72, 1u32.to_le_bytes().to_vec()), // wrong region count
            (first_layout + 76, 0u64.to_le_bytes().to_vec()), // region at address 0
            (first_layout + 84, 1u64.to_le_bytes().to_vec()), // region too small
            (ipc_at, u32::MAX.to_le_bytes().to_vec()),  // huge IPC count
            (ipc_at, 2u32.to_le_bytes().to_vec()),      // more allocations than present
            (
                ipc_at + 4 + 16 + 64,
                0x7f00_0000_1000u64.to_le_bytes().to_vec(),
            ), // starts late
            (ipc_at + 4 + 16 + 72, 0x1000u64.to_le_bytes().to_vec()), // ends early
            (second_ipc_at, 1u32.to_le_bytes().to_vec()), // IPC for pinned memory
            (arena_at + 16, 100_000u32.to_le_bytes().to_vec()), // too many slots
            (arena_at + 8, (1u64 << 40).to_le_bytes().to_vec()), // huge slots
            (arena_at, u64::MAX.to_le_bytes().to_vec()), // wrapping arena
            (device_arena_at + 16, 100_000u32.to_le_bytes().to_vec()), // too many slots
            (device_arena_at, 0u64.to_le_bytes().to_vec()), // device arena at 0
            (device_arena_at + 20, (-1i32).to_le_bytes().to_vec()), // negative device
        ];
        for (at, patch) in cases {
            let mut b = good.clone();
            b[at..at + patch.len()].copy_from_slice(&patch);
            if at == first_layout + 60 && patch == 2u32.to_le_bytes() {
                // Two heads alone are valid; with a begin of u32::MAX they overflow.
                b[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            let r = PeerBlob::decode(&reseal(b), None);
            assert!(r.is_err(), "patch at {at} accepted");
        }
    }

    #[test]
    fn version_3_exports_import_without_ipc_or_origin() {
        let b = blob();
        let v3 = seal_as(&b.body(3).unwrap(), None, 3).unwrap();
        let back = PeerBlob::decode(&v3, None).unwrap();
        assert_eq!(back.origin, Origin::default());
        assert_eq!(back.arena, None);
        assert_eq!(back.device_arena, None);
        assert!(back.layouts.iter().all(|l| l.ipc.is_none()));
        assert_eq!(back.layouts[0].regions, b.layouts[0].regions);
    }

    #[test]
    fn version_4_exports_import_without_a_device_arena() {
        let b = blob();
        let v4 = seal_as(&b.body(4).unwrap(), None, 4).unwrap();
        let back = PeerBlob::decode(&v4, None).unwrap();
        assert_eq!(back.arena, b.arena);
        assert_eq!(back.device_arena, None);
        assert_eq!(back.layouts, b.layouts);
    }

    #[test]
    fn heads_travel_and_version_2_exports_still_import() {
        let mut b = blob();
        b.layouts[0].config.inner_dim = 64;
        b.layouts[0].config.heads = Heads {
            num_heads: 4,
            head_begin: 4,
            order: HeadOrder::HeadMajor,
        };
        let back = PeerBlob::decode(&b.encode(None).unwrap(), None).unwrap();
        assert_eq!(back.layouts[0].config.heads, b.layouts[0].config.heads);
        // Version 2: no heads on the wire; the layouts import opaque.
        let v2 = seal_as(&b.body(2).unwrap(), None, 2).unwrap();
        let back = PeerBlob::decode(&v2, None).unwrap();
        assert_eq!(back.layouts[0].config.heads, Heads::OPAQUE);
        assert_eq!(back.layouts.len(), b.layouts.len());
        // Version 1 and 6 are refused by name.
        for v in [1u16, 6] {
            let e = PeerBlob::decode(&seal_as(&b.body(5).unwrap(), None, v).unwrap(), None)
                .unwrap_err();
            assert!(e.to_string().contains("versions 2 to 5"), "{e}");
        }
    }

    #[test]
    fn random_and_foreign_bytes_are_refused() {
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 0..2000 {
            let len = rng.usize(0..512);
            let mut b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if n % 2 == 0 && len >= 8 {
                b[..8].copy_from_slice(MAGIC); // past the magic, into the checks behind it
            }
            assert!(PeerBlob::decode(&b, None).is_err());
        }
        assert!(PeerBlob::decode(b"\x7fELF\x02\x01\x01\0 not a peer export at all", None).is_err());
    }

    #[test]
    fn keyed_exports_read_only_with_the_same_key() {
        let key = PeerKey::new(b"deployment secret 1").unwrap();
        let other = PeerKey::new(b"deployment secret 2").unwrap();
        assert!(matches!(
            PeerKey::new(b"too short"),
            Err(Error::InvalidArgument(_))
        ));
        let b = blob();
        let keyed = b.encode(Some(&key)).unwrap();
        assert_eq!(PeerBlob::decode(&keyed, Some(&key)).unwrap(), b);
        for (bytes, k) in [
            (&keyed, Some(&other)),
            (&keyed, None),
            (&b.encode(None).unwrap(), Some(&key)),
            (&b.encode(Some(&other)).unwrap(), Some(&key)),
        ] {
            assert!(matches!(PeerBlob::decode(bytes, k), Err(Error::Peer(_))));
        }
        // One flipped bit anywhere but the checksum, which is then recomputed: the MAC still
        // refuses it.
        for at in (0..keyed.len()).filter(|at| !(16..24).contains(at)) {
            let mut m = keyed.clone();
            m[at] ^= 0x10;
            let body_end = m.len() - MAC_LEN;
            let sum = xxh3_64(&m[HEADER..body_end]);
            m[16..24].copy_from_slice(&sum.to_le_bytes());
            assert!(
                PeerBlob::decode(&m, Some(&key)).is_err(),
                "bit flipped at {at} accepted"
            );
        }
    }
}
