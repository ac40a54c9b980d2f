//! NIXL loading and agents. Without NIXL these tests report themselves skipped (not passed);
//! with KVX_REQUIRE_NIXL set (the project's test command sets it) a missing NIXL fails them.

use std::panic::catch_unwind;
use std::process::Command;

use kvxfer::exec::nixl::loader;
use kvxfer::ffi::context::{KVX_BACKEND_GDS, KVX_BACKEND_POSIX};
use kvxfer::{Context, ContextConfig, Error};

fn default_context_makes_an_agent_with_ucx_and_posix() {
    let ctx = Context::new(ContextConfig::default()).expect("context with UCX and POSIX");
    assert_eq!(ctx.nixl_backends(), ["UCX", "POSIX"]);
}

fn generated_agent_names_are_unique() {
    let (a, b) = (
        Context::new(ContextConfig::default()).unwrap(),
        Context::new(ContextConfig::default()).unwrap(),
    );
    assert_ne!(a.name(), b.name());
    let named = Context::new(ContextConfig {
        agent_name: Some("prefill-7".into()),
        nixl_backends: KVX_BACKEND_POSIX,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(named.name(), "prefill-7");
    assert_eq!(named.nixl_backends(), ["POSIX"]);
}

/// GDS needs cuFile and a GPU: where it cannot be created, the error names it.
fn a_backend_that_cannot_be_created_is_named() {
    let r = Context::new(ContextConfig {
        nixl_backends: KVX_BACKEND_POSIX | KVX_BACKEND_GDS,
        ..Default::default()
    });
    match r {
        Ok(ctx) => assert_eq!(ctx.nixl_backends(), ["POSIX", "GDS"]),
        Err(Error::Unavailable(m)) => assert!(m.contains("GDS"), "{m}"),
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

/// Run in a child process with every NIXL location hidden: the context is refused with
/// instructions, and the process does not abort (nixl-sys's stubs would abort it).
fn missing_nixl_is_unavailable_not_an_abort() {
    if std::path::Path::new("/opt/nvidia/nvda_nixl").exists() {
        return; // a system install is found by design
    }
    let empty = std::env::temp_dir().join(format!("kvx-no-nixl-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvxfer"))
        .args(["demo", "--blocks", "1"])
        .env("KVX_NIXL_LIB_DIR", empty.join("nothing-here"))
        .env("HOME", &empty)
        .env("XDG_DATA_HOME", &empty)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run kvxfer demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("NIXL is not available"), "{stdout}");
    assert!(
        stdout.contains("pip install --no-deps --target"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&empty);
}

fn main() {
    let tests: [(&str, fn()); 4] = [
        (
            "default_context_makes_an_agent_with_ucx_and_posix",
            default_context_makes_an_agent_with_ucx_and_posix,
        ),
        (
            "generated_agent_names_are_unique",
            generated_agent_names_are_unique,
        ),
        (
            "a_backend_that_cannot_be_created_is_named",
            a_backend_that_cannot_be_created_is_named,
        ),
        (
            "missing_nixl_is_unavailable_not_an_abort",
            missing_nixl_is_unavailable_not_an_abort,
        ),
    ];
    if let Err(e) = loader::load() {
        if std::env::var_os("KVX_REQUIRE_NIXL").is_some() {
            println!("NIXL must load here (KVX_REQUIRE_NIXL is set): {e}");
            println!("0 passed, {} failed", tests.len());
            std::process::exit(1);
        }
        println!("NIXL cannot load: {e}");
        println!("0 passed, 0 failed, {} skipped", tests.len());
        return;
    }
    let mut failed = 0;
    for (name, test) in tests {
        let ok = catch_unwind(test).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        failed += usize::from(!ok);
    }
    println!(
        "{} passed, {failed} failed, 0 skipped",
        tests.len() - failed
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
