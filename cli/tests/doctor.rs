//! `kvxfer doctor --json`: every check named, with a hint exactly where something is missing.

use std::process::Command;

#[test]
fn doctor_reports_every_piece_with_hints_for_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvxfer"))
        .args(["doctor", "--json"])
        .env("NIXL_LOG_LEVEL", "ERROR")
        .output()
        .expect("run kvxfer doctor");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["kvxfer"], env!("CARGO_PKG_VERSION"));
    let checks = v["checks"].as_array().expect("checks");
    for name in ["cuda", "nixl", "ulimit -l"] {
        assert!(
            checks.iter().any(|c| c["name"] == name),
            "{name} missing: {v}"
        );
    }
    for c in checks {
        let ok = c["ok"].as_bool().expect("ok is a bool");
        assert_eq!(c["hint"].is_null(), ok, "hint exactly when not ok: {c}");
        assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
    }
}
