//! include/kvxfer.h must be exactly what the pinned cbindgen generates from src/ffi.
//! `KVX_BLESS=1 cargo test --test header` rewrites it.

use std::path::Path;

fn generate() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut config = cbindgen::Config::from_file(Path::new(root).join("cbindgen.toml"))
        .expect("cbindgen.toml parses");
    let version = format!(
        "\n#define KVX_VERSION_MAJOR {}\n#define KVX_VERSION_MINOR {}\n#define KVX_VERSION_PATCH {}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH"),
    );
    config.after_includes = Some(version + config.after_includes.as_deref().unwrap_or(""));
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/kvxfer.h");
    let fresh = generate();
    if std::env::var_os("KVX_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/kvxfer.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/kvxfer.h is stale: regenerate it with `KVX_BLESS=1 cargo test --test header`"
    );
}

#[test]
fn header_declares_every_exported_function() {
    let header = generate();
    for name in [
        "kvx_status_name",
        "kvx_last_error",
        "kvx_version",
        "kvx_context_config_init",
        "kvx_context_new",
        "kvx_context_free",
        "kvx_layout_config_init",
        "kvx_layout_new",
        "kvx_layout_wrap",
        "kvx_layout_region",
        "kvx_layout_free",
        "kvx_plan_transfer",
        "kvx_plan_kinds",
        "kvx_strategy_name",
        "kvx_transfer_options_init",
        "kvx_transfer_submit",
        "kvx_transfer_poll",
        "kvx_transfer_wait",
        "kvx_transfer_stream_wait",
        "kvx_transfer_get_stats",
        "kvx_transfer_free",
        "kvx_context_export",
        "kvx_bytes_free",
        "kvx_context_import",
        "kvx_peer_layout_count",
        "kvx_peer_layout",
        "kvx_peer_free",
        "kvx_context_next_notification",
        "kvx_layout_fill",
        "kvx_layout_checksum",
        "kvx_set_log_callback",
    ] {
        let declared = header
            .lines()
            .any(|l| !l.trim_start().starts_with('*') && l.contains(&format!("{name}(")));
        assert!(declared, "{name} missing from the header");
    }
    for name in [
        "KVX_VERSION_MAJOR",
        "KVX_STATUS_PANIC",
        "KVX_STRATEGY_INVALID",
        "KVX_BACKEND_GDS_MT",
        "KVX_COPY_MODE_KERNEL",
        "KVX_PLAN_KIND_TWO_HOP",
        "KVX_STORAGE_KIND_DISK",
        "KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST",
    ] {
        assert!(
            header.contains(&format!("#define {name} ")),
            "{name} missing"
        );
    }
}

/// Every name the header puts into a C or C++ program carries kvxfer's prefix (macros KVX_,
/// types and functions kvx_): a bare name such as `VERSION` breaks code that has its own.
#[test]
fn every_name_in_the_header_is_prefixed() {
    let header = generate();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = Vec::new();
    // File-scope lines only: members and parameters are indented.
    for line in header
        .lines()
        .filter(|l| !l.starts_with([' ', '*', '/', '}']))
    {
        if let Some(rest) = line.strip_prefix("#define ") {
            names.push(ident(rest));
        } else if let Some(rest) = line
            .strip_prefix("typedef struct ")
            .or_else(|| line.strip_prefix("struct "))
        {
            names.push(ident(rest));
        } else if let Some(at) = line.find("(*")
            && line.starts_with("typedef")
        {
            // `typedef T (*kvx_fn)(...)`: a function pointer type.
            names.push(ident(&line[at + 2..]));
        } else if let Some(open) = line.find('(')
            && !line.starts_with('#')
        {
            // `T kvx_f(`: the identifier before the first '('.
            let before = line[..open].trim_end();
            let start = before
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            names.push(before[start..].to_string());
        }
    }
    let bad: Vec<&String> = names
        .iter()
        .filter(|n| !n.starts_with("KVX_") && !n.starts_with("kvx_") && *n != "KVXFER_H")
        .collect();
    assert!(names.len() > 40, "too few names found: {names:?}");
    assert!(
        bad.is_empty(),
        "names without the kvx_/KVX_ prefix: {bad:?}"
    );
}
