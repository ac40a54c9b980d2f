//! Finding and loading NIXL's C API library. nixl-sys's stubs `dlopen("libnixl_capi.so")` on
//! first use and abort the process if that fails, so kvxfer loads the library itself, by full
//! path, before any nixl-sys call; the stubs then find it by its soname.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

const LIB: &str = "libnixl_capi.so";
/// Where NVIDIA's wheels keep their libraries inside a `pip install --target` folder.
const WHEEL_LIB_DIRS: [&str; 2] = [".nixl_cu12.mesonpy.libs", ".nixl_cu13.mesonpy.libs"];
/// NVIDIA's default system install.
const SYSTEM_DIRS: [&str; 3] = [
    "/opt/nvidia/nvda_nixl/lib/x86_64-linux-gnu",
    "/opt/nvidia/nvda_nixl/lib64",
    "/opt/nvidia/nvda_nixl/lib",
];

/// The project-local folder `scripts/dev` installs the NIXL wheel into (`pip install
/// --target`): `.deps/nixl` in the source tree kvxfer was built from.
pub fn project_install_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/nixl")
}

/// A per-user folder for installs outside the source tree: `$XDG_DATA_HOME/kvxfer/nixl`, or
/// `~/.local/share/kvxfer/nixl`.
pub fn user_install_dir() -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))?;
    Some(data.join("kvxfer/nixl"))
}

/// `KVX_NIXL_ONLY_LIB_DIR=1`: look in KVX_NIXL_LIB_DIR and nowhere else, so that a deployment
/// decides exactly which NIXL it gets.
fn only_lib_dir() -> bool {
    std::env::var("KVX_NIXL_ONLY_LIB_DIR").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Folders that may hold libnixl_capi.so, most specific first.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::var_os("KVX_NIXL_LIB_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if !only_lib_dir() {
        roots.push(project_install_dir());
        roots.extend(user_install_dir());
    }
    let mut dirs = Vec::new();
    for r in roots {
        dirs.push(r.clone());
        dirs.extend(WHEEL_LIB_DIRS.iter().map(|w| r.join(w)));
    }
    if !only_lib_dir() {
        dirs.extend(SYSTEM_DIRS.iter().map(PathBuf::from));
    }
    dirs
}

fn dlopen(name: &str) -> std::result::Result<(), String> {
    let c = CString::new(name).map_err(|_| format!("{name}: path contains NUL"))?;
    // SAFETY: loading a shared library; its initialisers are NIXL's own. The handle is kept
    // for the life of the process (never dlclose'd), as nixl-sys expects.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local message or NULL.
        let msg = unsafe { libc::dlerror() };
        let why = if msg.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: a NUL-terminated string from the loader.
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(why);
    }
    Ok(())
}

static LOADED: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// Loads NIXL once per process; returns where it came from, or `Unavailable` with how to
/// install it.
pub fn load() -> Result<&'static str> {
    LOADED
        .get_or_init(|| {
            let loaded = find_and_load();
            match &loaded {
                Ok(from) => tracing::info!("NIXL loaded from {from}"),
                Err(why) => tracing::info!("{why}"),
            }
            loaded
        })
        .as_deref()
        .map_err(|why| Error::Unavailable(why.clone()))
}

fn find_and_load() -> std::result::Result<String, String> {
    let mut failures = Vec::new();
    for dir in candidate_dirs() {
        let path = dir.join(LIB);
        if !path.exists() {
            continue;
        }
        let path = path.to_string_lossy().into_owned();
        match dlopen(&path) {
            Ok(()) => return Ok(path),
            Err(why) => failures.push(format!("{path}: {why}")),
        }
    }
    // Last: wherever the dynamic loader finds it (LD_LIBRARY_PATH, ldconfig).
    if only_lib_dir() {
        return Err(not_found(&failures));
    }
    match dlopen(LIB) {
        Ok(()) => Ok(LIB.to_string()),
        Err(_) => Err(not_found(&failures)),
    }
}

fn not_found(failures: &[String]) -> String {
    let project = project_install_dir().display().to_string();
    let user = user_install_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "~/.local/share/kvxfer/nixl".into());
    let mut msg = format!(
        "NIXL is not available: {LIB} was not found in KVX_NIXL_LIB_DIR, {project}, {user}, \
         /opt/nvidia/nvda_nixl or the library path. Install NVIDIA's wheel with \
         `pip install --no-deps --target {user} nixl-cu12==1.5.1`, or point KVX_NIXL_LIB_DIR \
         at the folder holding {LIB}; a context with nixl_backends = 0 needs no NIXL"
    );
    if !failures.is_empty() {
        msg.push_str(&format!(
            " (found but could not load: {})",
            failures.join("; ")
        ));
    }
    msg
}
