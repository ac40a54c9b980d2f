//! The runner of the tests that need NIXL (harness = false): child-process roles, a table of
//! tests, visible skips. Without NIXL every test reports itself skipped, never passed; with
//! KVX_REQUIRE_NIXL set (the project's test command sets it) a missing NIXL fails them.

use std::panic::catch_unwind;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A child process's part: the environment variable that selects it (holding the folder the
/// processes share) and what it runs.
pub type Role = (&'static str, fn(&Path));

static SKIPPED: AtomicUsize = AtomicUsize::new(0);

/// Marks the running test skipped, saying why.
pub fn skip(why: &str) {
    println!("  skipped: {why}");
    SKIPPED.fetch_add(1, Ordering::Relaxed);
}

/// `[(name, test)]` of the listed test functions.
#[macro_export]
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        [$((stringify!($test), $test as fn())),*]
    };
}

/// Runs the role named in the environment, if one is; else every test, and exits non-zero if
/// any failed.
pub fn main(roles: &[Role], tests: &[(&str, fn())]) {
    for (role, run) in roles {
        if let Some(dir) = std::env::var_os(role) {
            run(Path::new(&dir));
            return;
        }
    }
    if let Err(e) = kvxfer::load_nixl() {
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
        let skipped_before = SKIPPED.load(Ordering::Relaxed);
        let ok = catch_unwind(test).is_ok();
        let skipped = SKIPPED.load(Ordering::Relaxed) > skipped_before;
        let word = match (ok, skipped) {
            (true, true) => "skipped",
            (true, false) => "ok",
            (false, _) => "FAILED",
        };
        println!("test {name} ... {word}");
        failed += usize::from(!ok);
    }
    let skipped = SKIPPED.load(Ordering::Relaxed);
    println!(
        "{} passed, {failed} failed, {skipped} skipped",
        tests.len() - failed - skipped
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
