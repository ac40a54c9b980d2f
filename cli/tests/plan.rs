//! `kvxfer plan` as a user runs it: the matrix with its legend, the list, and JSON rows.

use std::process::Command;

fn kvxfer(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvxfer"))
        .args(args)
        .output()
        .expect("run kvxfer");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn the_matrix_has_every_location_and_a_legend() {
    let m = kvxfer(&["plan"]);
    let rows: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("remote ")
                || l.starts_with("System")
                || l.starts_with("Pinned")
                || l.starts_with("Device")
                || l.starts_with("Disk")
        })
        .collect();
    assert_eq!(rows.len(), 8, "{m}");
    let system = rows.iter().find(|r| r.starts_with("System")).unwrap();
    assert!(
        system.contains("memcpy") && system.contains("bH2D"),
        "{system}"
    );
    assert!(m.contains("D2H>P>wr"), "device -> disk is two hops: {m}");
    assert!(
        m.contains("rdF     NIXL read issued by the destination"),
        "{m}"
    );
}

#[test]
fn json_has_one_row_per_pair_and_gds_changes_device_to_disk() {
    let rows: Vec<serde_json::Value> = kvxfer(&["plan", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 64);
    let refused = rows.iter().filter(|r| r["plan"] == "refused").count();
    assert!(
        refused > 0
            && rows
                .iter()
                .all(|r| r["plan"] != "refused" || r["reason"].is_string())
    );
    let d2disk = |gds: bool| -> serde_json::Value {
        let mut args = vec!["plan", "--json", "--src", "device", "--dst", "disk"];
        if gds {
            args.push("--gds");
        }
        serde_json::from_str(kvxfer(&args).trim()).unwrap()
    };
    assert_eq!(d2disk(false)["plan"], "two_hop");
    assert_eq!(d2disk(true)["plan"], "direct");
}
