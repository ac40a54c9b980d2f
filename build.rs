//! Records the Linux soname of the shared library; writes nothing outside OUT_DIR.

fn main() {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor = env!("CARGO_PKG_VERSION_MINOR");
    // 0.x releases break ABI on minor bumps, so the soname carries the minor too.
    let soversion = if major == 0 {
        format!("0.{minor}")
    } else {
        major.to_string()
    };
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libkvxfer.so.{soversion}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
