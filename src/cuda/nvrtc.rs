//! NVRTC, loaded at run time from wherever the CUDA toolkit put it. cudarc's loader only looks
//! for the library names of the CUDA version it was built for, so kvxfer finds it itself.

use std::ffi::{CString, c_char, c_int, c_void};

use libloading::Library;

use crate::error::{Error, Result, bail};

type Program = *mut c_void;
type Status = c_int;

struct Api {
    _lib: Library,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Program) -> Status,
}

/// Candidate locations, most specific first: `KVX_NVRTC_LIB`, the loader's search path, then
/// the usual toolkit folders.
fn candidates() -> Vec<String> {
    let names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
    let mut out: Vec<String> = std::env::var("KVX_NVRTC_LIB").into_iter().collect();
    out.extend(names.iter().map(|n| n.to_string()));
    let mut dirs: Vec<String> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .map(|d| format!("{d}/lib64"))
        .collect();
    dirs.extend(
        [
            "/usr/local/cuda/lib64",
            "/usr/local/cuda/targets/x86_64-linux/lib",
        ]
        .iter()
        .map(|d| d.to_string()),
    );
    for d in dirs {
        out.extend(names.iter().map(|n| format!("{d}/{n}")));
    }
    out
}

/// Where NVRTC is loaded from, or `Unavailable` with where it was looked for.
pub fn location() -> Result<String> {
    load().map(|(_, from)| from)
}

fn load() -> Result<(Api, String)> {
    let mut tried = Vec::new();
    for c in candidates() {
        // SAFETY: loading NVRTC runs no initialisers with preconditions.
        let lib = match unsafe { Library::new(&c) } {
            Ok(l) => l,
            Err(_) => {
                tried.push(c);
                continue;
            }
        };
        // SAFETY: the symbol types are NVRTC's documented C signatures.
        unsafe {
            let api = Api {
                create: *lib.get(b"nvrtcCreateProgram\0").map_err(sym)?,
                compile: *lib.get(b"nvrtcCompileProgram\0").map_err(sym)?,
                ptx_size: *lib.get(b"nvrtcGetPTXSize\0").map_err(sym)?,
                ptx: *lib.get(b"nvrtcGetPTX\0").map_err(sym)?,
                log_size: *lib.get(b"nvrtcGetProgramLogSize\0").map_err(sym)?,
                log: *lib.get(b"nvrtcGetProgramLog\0").map_err(sym)?,
                destroy: *lib.get(b"nvrtcDestroyProgram\0").map_err(sym)?,
                _lib: lib,
            };
            tracing::info!("NVRTC loaded from {c}");
            return Ok((api, c));
        }
    }
    bail!(
        Unavailable,
        "NVRTC was not found (set KVX_NVRTC_LIB to libnvrtc.so); tried {}",
        tried.join(", ")
    )
}

fn sym(e: libloading::Error) -> Error {
    Error::Unavailable(format!("NVRTC lacks a symbol: {e}"))
}

/// Compiles CUDA C `source` to PTX for `arch` (e.g. "compute_90").
pub fn compile_ptx(source: &str, name: &str, arch: &str) -> Result<CString> {
    let (api, _) = load()?;
    let src = CString::new(source).map_err(|_| Error::Internal("kernel source has NUL".into()))?;
    let name = CString::new(name).map_err(|_| Error::Internal("kernel name has NUL".into()))?;
    let opts = [
        CString::new(format!("--gpu-architecture={arch}")).unwrap_or_default(),
        CString::new("-default-device").unwrap_or_default(),
    ];
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: Program = std::ptr::null_mut();
    // SAFETY: NVRTC's contract: valid strings, no headers; `prog` is destroyed below.
    unsafe {
        if (api.create)(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        ) != 0
        {
            bail!(Unavailable, "nvrtcCreateProgram failed");
        }
        let compiled = (api.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
        let result = if compiled != 0 {
            let mut n = 0;
            (api.log_size)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (api.log)(prog, log.as_mut_ptr().cast());
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .to_string();
            Err(Error::Unavailable(format!(
                "NVRTC could not compile the copy kernel for {arch}: {log}"
            )))
        } else {
            let mut n = 0;
            (api.ptx_size)(prog, &mut n);
            let mut ptx = vec![0u8; n.max(1)];
            (api.ptx)(prog, ptx.as_mut_ptr().cast());
            let end = ptx.iter().position(|&b| b == 0).unwrap_or(ptx.len());
            ptx.truncate(end);
            CString::new(ptx).map_err(|_| Error::Internal("PTX has NUL".into()))
        };
        (api.destroy)(&mut prog);
        result
    }
}
