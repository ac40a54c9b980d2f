//! `kvxfer bench` (host scatter) as a user runs it: a table with a legend, JSON rows, a plot.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvxfer"))
        .args([
            "bench",
            "--total-mib",
            "4",
            "--iters",
            "1",
            "--fragments-kib",
            "4,64",
        ])
        .args(args)
        .output()
        .expect("run kvxfer bench")
}

#[test]
fn the_table_explains_its_columns_and_json_has_every_baseline() {
    let out = bench(&[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("columns:") && text.contains("naive"),
        "{text}"
    );
    let out = bench(&["--json"]);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2 * 3, "two fragments, three baselines");
    assert!(
        rows.iter()
            .all(|r| r["gbps"].as_f64().is_some_and(|g| g > 0.0))
    );
}

/// A PNG where a TrueType font is found (the test command installs fonts-dejavu-core); else
/// the error says how to get one.
#[test]
fn plot_writes_a_png_or_says_which_font_is_missing() {
    let path = std::env::temp_dir().join(format!("kvx-plot-{}.png", std::process::id()));
    let out = bench(&["--plot", path.to_str().unwrap()]);
    if out.status.success() {
        let png = std::fs::read(&path).expect("the plot file");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 10_000, "an empty picture: {} bytes", png.len());
        let _ = std::fs::remove_file(&path);
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("fonts-dejavu-core"), "{err}");
    }
}
