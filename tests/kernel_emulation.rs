//! The copy kernel's CUDA source (src/exec/cuda/copy_blocks.cu) run on the CPU, where no GPU
//! is: tests/kernel_emulation/emulate.cpp compiles it with a lane-lockstep emulation of the
//! warp intrinsics (simt.h) and checks every byte it writes and every per-layer count against a
//! plain reference copy, under AddressSanitizer and UBSan so that an access outside the layouts
//! fails too. Needs a C++20 compiler (`c++`, or `CXX`), as the C++ tests do.

use std::path::Path;
use std::process::Command;

#[test]
fn the_copy_kernel_moves_exactly_the_requested_bytes_on_emulated_warps() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emulation");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-g",
            "-pthread",
            "-Wall",
            "-Wextra",
            "-Wno-unknown-pragmas",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ])
        .arg(dir.join("emulate.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("this test compiles C++20 with `{cxx}` (set CXX): {e}"));
    assert!(
        built.status.success(),
        "{cxx} could not build the emulation:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .output()
        .expect("the emulation runs");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && out.contains(" 0 failures"),
        "{out}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The emulation ran its cases (a build that ran nothing would say so here).
    let cases: usize = out
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cases >= 300, "{out}");
}
