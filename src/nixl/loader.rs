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

/// `site-packages` folders of the Python environments this process may use, most specific
/// first: the active virtual or conda environment, then the prefixes of every `python3` on
/// PATH (a pyenv or venv interpreter, the system's), then the user's own packages. NVIDIA's
/// wheel (`pip install nixl-cu12`) puts the libraries in one of them.
fn python_site_dirs() -> Vec<PathBuf> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    site_dirs_of(
        [var("VIRTUAL_ENV"), var("CONDA_PREFIX")],
        var("PATH"),
        var("HOME"),
    )
}

/// `python_site_dirs` for the given environment.
fn site_dirs_of(
    envs: [Option<std::ffi::OsString>; 2],
    path: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = envs.into_iter().flatten().map(PathBuf::from).collect();
    if let Some(path) = path {
        for dir in std::env::split_paths(&path) {
            if dir.join("python3").exists()
                && let Some(prefix) = dir.parent()
            {
                prefixes.push(prefix.to_path_buf());
            }
        }
    }
    if let Some(home) = home {
        prefixes.push(Path::new(&home).join(".local"));
    }
    let mut out = Vec::new();
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
            continue;
        };
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        // Newest first: python3.12 before python3.9.
        let minor = |p: &PathBuf| -> u32 {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            name.trim_start_matches("python3.").parse().unwrap_or(0)
        };
        versions.sort_by_key(|v| std::cmp::Reverse(minor(v)));
        for v in versions {
            for packages in ["site-packages", "dist-packages"] {
                let d = v.join(packages);
                if d.is_dir() && !out.contains(&d) {
                    out.push(d);
                }
            }
        }
    }
    out
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
        roots.extend(python_site_dirs());
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
         the Python environments' site-packages, /opt/nvidia/nvda_nixl or the library path. \
         Install NVIDIA's wheel with `pip install nixl-cu12==1.5.1` (into the active Python \
         environment) or `pip install --no-deps --target {user} nixl-cu12==1.5.1`, or point \
         KVX_NIXL_LIB_DIR at the folder holding {LIB}; a context with nixl_backends = 0 \
         needs no NIXL"
    );
    if !failures.is_empty() {
        msg.push_str(&format!(
            " (found but could not load: {})",
            failures.join("; ")
        ));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_environments_are_searched_active_first() {
        let root = std::env::temp_dir().join(format!("kvx-site-{}", std::process::id()));
        let mk = |p: &str| {
            let d = root.join(p);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let venv_site = mk("venv/lib/python3.11/site-packages");
        let bin = mk("pyenv/bin");
        std::fs::write(bin.join("python3"), "").unwrap();
        let old = mk("pyenv/lib/python3.9/site-packages");
        let new = mk("pyenv/lib/python3.12/site-packages");
        let user = mk("home/.local/lib/python3.11/site-packages");
        mk("nopython/bin");
        let path = std::env::join_paths([root.join("nopython/bin"), bin]).unwrap();
        let dirs = site_dirs_of(
            [Some(root.join("venv").into()), None],
            Some(path),
            Some(root.join("home").into()),
        );
        assert_eq!(dirs, vec![venv_site, new, old, user]);
        let _ = std::fs::remove_dir_all(&root);
    }
}
