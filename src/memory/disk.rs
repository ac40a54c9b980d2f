//! Disk storage: one file per layout. Allocation `i` of the layout lives at offset
//! `i * stride` (page-aligned), and those offsets are the layout's addresses.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Alignment O_DIRECT I/O needs of buffer addresses, file offsets and lengths (the largest
/// logical block size in common use).
pub(crate) const DIRECT_ALIGN: u64 = 4096;

#[derive(Debug)]
pub struct DiskFile {
    file: File,
    /// The same file opened with O_DIRECT, where the file system allows it: I/O that is
    /// DIRECT_ALIGN-aligned bypasses the page cache through it.
    direct: Option<File>,
    /// A temporary file that keeps its name while open, removed on drop.
    remove: Option<PathBuf>,
    /// A file at a caller's path: its (device, inode), claimed in LIVE while this lives.
    claim: Option<FileId>,
}

/// (device, inode) of a file.
type FileId = (u64, u64);

/// Files at callers' paths that a live disk layout of this process uses. Two layouts on one file
/// would alias: a transfer between them could read bytes the same transfer overwrites.
static LIVE: Mutex<Option<HashSet<FileId>>> = Mutex::new(None);

impl Drop for DiskFile {
    fn drop(&mut self) {
        if let Some(p) = &self.remove {
            let _ = std::fs::remove_file(p);
        }
        if let Some(id) = self.claim {
            let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
            live.get_or_insert_default().remove(&id);
        }
    }
}

/// Opens `file` again with O_DIRECT through /proc (which also works for unlinked files);
/// `None` where the file system refuses O_DIRECT (tmpfs, for one).
fn reopen_direct(file: &File) -> Option<File> {
    let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(proc)
        .ok()
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{what} {}: {e}", path.display()))
}

impl DiskFile {
    /// A new file in `dir`, `len` bytes long (sparse), never seen by others: unlinked at once,
    /// or with `named`, under a unique dot-name until it is dropped. cuFile needs the name: in
    /// compat mode it opens the file again by the path /proc gives, which an unlinked file
    /// does not have (docs/BENCHMARKS.md,
    /// "Two GPUs, GPU RDMA between processes, GDS, two-hop again": "open call failed for file
    /// /tmp/#8118299 (deleted)").
    pub fn temporary(dir: &Path, len: u64, named: bool) -> Result<Self> {
        let unique = || {
            dir.join(format!(
                ".kvxfer-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ))
        };
        let create = |name: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(name)
        };
        let (file, remove) = if named {
            let name = unique();
            let f = create(&name).map_err(|e| io("cannot create a disk layout file in", dir, e))?;
            (f, Some(name))
        } else {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(0o600)
                .open(dir)
                .or_else(|_| {
                    // File systems without O_TMPFILE: a unique name, removed right away.
                    let name = unique();
                    let f = create(&name)?;
                    std::fs::remove_file(&name)?;
                    Ok(f)
                })
                .map_err(|e| io("cannot create a disk layout file in", dir, e))?;
            (f, None)
        };
        let this = Self {
            direct: reopen_direct(&file),
            file,
            remove,
            claim: None,
        };
        this.file
            .set_len(len)
            .map_err(|e| io("cannot size a disk layout file in", dir, e))?;
        Ok(this)
    }

    /// The file at `path`, created if missing and grown to `len` bytes if shorter; kept after
    /// the layout is freed, so a layout of the same config reads its data back. A file another
    /// live disk layout of this process uses (the same device and inode, under any path) is
    /// refused before anything about it changes.
    pub fn at(path: &Path, len: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| io("cannot open disk layout file", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| io("cannot stat disk layout file", path, e))?;
        let id = (meta.dev(), meta.ino());
        {
            let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
            if !live.get_or_insert_default().insert(id) {
                return Err(Error::InvalidArgument(format!(
                    "{} is already the file of another live disk layout of this process; two \
                     layouts on one file would overwrite each other's blocks (free the other \
                     layout first, or use another file)",
                    path.display()
                )));
            }
        }
        // From here on, dropping `this` gives the claim back.
        let this = Self {
            direct: reopen_direct(&file),
            file,
            remove: None,
            claim: Some(id),
        };
        if meta.len() < len {
            this.file
                .set_len(len)
                .map_err(|e| io("cannot size disk layout file", path, e))?;
        }
        Ok(this)
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The O_DIRECT descriptor, if the file system allows one.
    pub fn direct_fd(&self) -> Option<i32> {
        self.direct.as_ref().map(|f| f.as_raw_fd())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::Io(format!(
                "reading {} bytes at offset {offset}: {e}",
                buf.len()
            ))
        })
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::Io(format!(
                "writing {} bytes at offset {offset}: {e}",
                buf.len()
            ))
        })
    }
}

/// Whether cuFile takes files in `dir`, asked once when a context that allows GDS is made: a
/// 4 KiB file there (named, O_DIRECT, as kvxfer's own) registered with the GDS backends alone.
/// Where cuFile refuses it (no nvidia-fs and no compat mode, a file system it does not know, no
/// udev description of the block device inside a container), the context is UNAVAILABLE with
/// the reason instead of every device <-> disk transfer failing later.
pub(crate) fn probe_gds(agent: &crate::nixl::NixlAgent, dir: &Path) -> Result<()> {
    let refuse = |why: String| {
        Error::Unavailable(format!(
            "GPUDirect Storage is not usable for files in {}: {why}. cuFile needs nvidia-fs or \
             its compat mode (allow_compat_mode in cufile.json), a file system it supports, and, \
             inside a container, udev's description of the block device (/run/udev); leave \
             allow_gds off to move device <-> disk through pinned memory",
            dir.display()
        ))
    };
    let file = DiskFile::temporary(dir, 4096, true)?;
    let Some(fd) = file.direct_fd() else {
        return Err(refuse("the file system refuses O_DIRECT".into()));
    };
    let region = crate::nixl::NixlRegion {
        addr: 0,
        len: 4096,
        mem: nixl_sys::MemType::File,
        device: fd as u64,
    };
    let handle = agent
        .agent()
        .register_memory(&region, Some(&agent.gds_args()?))
        .map_err(|e| refuse(format!("cuFile did not register the file ({e})")))?;
    drop(handle);
    Ok(())
}
