//! `kvxfer doctor`: what this machine gives kvxfer, with a hint for each missing piece.

use kvxfer::{Backends, Context, ContextConfig};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// One finding: what it is, whether kvxfer can use it, the detail, and what to do if not.
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    hint: &'static str,
}

fn memlock() -> (bool, String) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct given; RLIMIT_MEMLOCK is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return (false, "getrlimit failed".into());
    }
    let root = unsafe { libc::geteuid() } == 0; // SAFETY: no arguments, no failure.
    let show = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", v / 1024)
        }
    };
    let ok = root || r.rlim_cur == libc::RLIM_INFINITY || r.rlim_cur >= 1 << 30;
    (
        ok,
        format!(
            "{} (hard {}){}",
            show(r.rlim_cur),
            show(r.rlim_max),
            if root { ", root (CAP_IPC_LOCK)" } else { "" }
        ),
    )
}

fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    let cuda = kvxfer::cuda_info();
    out.push(match &cuda {
        Ok(i) => Check {
            name: "cuda",
            ok: true,
            detail: format!(
                "driver {}.{}, {} GPU(s): {}",
                i.driver_version / 1000,
                i.driver_version % 1000 / 10,
                i.devices.len(),
                i.devices.join(", ")
            ),
            hint: "",
        },
        Err(e) => Check {
            name: "cuda",
            ok: false,
            detail: e.to_string(),
            hint: "DEVICE storage needs an NVIDIA driver (libcuda.so.1); host and disk tiers \
                   work without one",
        },
    });
    if cuda.is_ok() {
        let ctx = Context::new(ContextConfig {
            nixl_backends: Backends::empty(),
            worker_threads: 1,
            ..Default::default()
        });
        let sms = ctx.as_ref().ok().and_then(Context::copy_kernel_sms);
        out.push(Check {
            name: "copy kernel SMs",
            ok: sms.is_some(),
            detail: match (sms, &ctx) {
                (Some([h2d, d2h, d2d]), _) => format!(
                    "host->device {h2d}, device->host {d2h}, device<->device {d2d} (the SM budget \
                     of max_sms = 0, measured on GPU 0)"
                ),
                (None, Ok(_)) => "the copy kernel is unavailable".into(),
                (None, Err(e)) => e.to_string(),
            },
            hint: "kvxfer's copy kernel needs NVRTC (below); without it AUTO uses the copy engines",
        });
        let nvrtc = kvxfer::nvrtc_location();
        out.push(Check {
            name: "nvrtc",
            ok: nvrtc.is_ok(),
            detail: nvrtc.unwrap_or_else(|e| e.to_string()),
            hint: "kvxfer's copy kernel is built with NVRTC (the CUDA toolkit's libnvrtc.so, or \
                   KVX_NVRTC_LIB); without it AUTO uses the copy engines for small fragments",
        });
        let ipc = kvxfer::same_host_ipc();
        out.push(Check {
            name: "same-host ipc",
            ok: ipc.is_ok(),
            detail: ipc.unwrap_or_else(|e| e),
            hint: "device memory of peers on this host then moves through NIXL, not CUDA IPC",
        });
    }
    let nixl = kvxfer::load_nixl();
    let nixl_ok = nixl.is_ok();
    out.push(Check {
        name: "nixl",
        ok: nixl_ok,
        detail: nixl.map(str::to_string).unwrap_or_else(|e| e.to_string()),
        hint: "disk and peers need NIXL: `pip install nixl-cu12` (or nixl-cu13 with CUDA 13) in \
               the active Python environment, or set KVX_NIXL_LIB_DIR",
    });
    if nixl_ok {
        for (bit, name, hint) in [
            (
                Backends::UCX,
                "nixl backend UCX",
                "peers need UCX (it ships in the NIXL wheel)",
            ),
            (
                Backends::POSIX,
                "nixl backend POSIX",
                "the disk tier needs the POSIX backend",
            ),
            (
                Backends::GDS,
                "nixl backend GDS",
                "GPUDirect Storage needs cuFile (libcufile.so.0, from the CUDA toolkit or the \
                 nvidia-cufile Python package) and a GPU; device <-> disk works without it",
            ),
            (
                Backends::GDS_MT,
                "nixl backend GDS_MT",
                "as GDS; GDS_MT runs one I/O per thread",
            ),
        ] {
            let made = Context::new(ContextConfig {
                nixl_backends: bit,
                worker_threads: 1,
                cuda_device: if cuda.is_ok() { 0 } else { -1 },
                ..Default::default()
            });
            out.push(Check {
                name,
                ok: made.is_ok(),
                detail: match made {
                    Ok(_) => "can be created".into(),
                    Err(e) => e.to_string(),
                },
                hint,
            });
        }
    }
    let (ok, detail) = memlock();
    out.push(Check {
        name: "ulimit -l",
        ok,
        detail,
        hint: "pinned memory without CUDA is mlock'ed: raise `ulimit -l` (memlock in \
               /etc/security/limits.conf) or grant CAP_IPC_LOCK for large pinned pools",
    });
    out
}

pub fn run(a: &Args) -> Result<(), String> {
    let checks = checks();
    if a.json {
        let v: Vec<Value> = checks
            .iter()
            .map(|c| {
                json!({"name": c.name, "ok": c.ok, "detail": c.detail,
                       "hint": if c.ok { Value::Null } else { c.hint.into() }})
            })
            .collect();
        println!("{}", json!({"kvxfer": kvxfer_version(), "checks": v}));
        return Ok(());
    }
    println!("kvxfer {} on this machine:", kvxfer_version());
    for c in &checks {
        println!(
            "  [{}] {:<20} {}",
            if c.ok { "ok" } else { "--" },
            c.name,
            c.detail
        );
        if !c.ok && !c.hint.is_empty() {
            println!("       {:<20} hint: {}", "", c.hint);
        }
    }
    Ok(())
}

fn kvxfer_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
