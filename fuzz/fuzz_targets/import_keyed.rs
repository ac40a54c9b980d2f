//! The whole import path of a context with a peer key, on arbitrary bytes: `Context::import`
//! must refuse every input (nothing made without the key is accepted), never panic, crash or
//! hang. The fuzzing process first moves into a network namespace of its own with only
//! loopback up, so that nothing a mutated input holds could reach another machine.
//! Run: `cargo fuzz run import_keyed` (as root: the namespace needs CAP_SYS_ADMIN) with NIXL
//! findable (KVX_NIXL_LIB_DIR, or the project's .deps/nixl).
#![no_main]

use std::sync::OnceLock;

use kvxfer::fuzzing::{PeerBlob, seal};
use kvxfer::{Context, ContextConfig, PeerKey};
use libfuzzer_sys::fuzz_target;

struct Importer {
    ctx: Context,
    /// A genuine keyed export of another context of the same deployment, for mutations that
    /// start from real bytes.
    real: Vec<u8>,
}

fn importer() -> &'static Importer {
    static IMPORTER: OnceLock<Importer> = OnceLock::new();
    IMPORTER.get_or_init(|| {
        // SAFETY: unshare has no memory-safety preconditions; libFuzzer has started no threads.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "a private network namespace is required (run as root)"
        );
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("iproute2");
        assert!(up.success());
        let key = || Some(PeerKey::new(b"fuzzing deployment secret").unwrap());
        let config = || ContextConfig {
            peer_key: key(),
            ..Default::default()
        };
        let exporter = Box::leak(Box::new(Context::new(config()).expect("NIXL")));
        let layout = Box::leak(Box::new(
            exporter
                .new_layout(
                    kvxfer::LayoutConfig {
                        num_blocks: 4,
                        num_layers: 2,
                        outer_dim: 2,
                        page_size: 4,
                        inner_dim: 64,
                        dtype_width: 2,
                        alignment: 1,
                        kind: kvxfer::LayoutKind::LayerSeparateBlockFirst,
                        heads: Default::default(),
                    },
                    &kvxfer::StorageSpec::new(kvxfer::StorageKind::System),
                )
                .unwrap(),
        ));
        let real = exporter.export(&[&*layout]).unwrap();
        Importer {
            ctx: Context::new(config()).expect("NIXL"),
            real,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let imp = importer();
    // The input as it is, sealed without a key, and spliced into the real export.
    let mut spliced = imp.real.clone();
    for (i, b) in data.iter().enumerate().take(spliced.len()) {
        spliced[(i * 131) % imp.real.len()] ^= b;
    }
    let mut inputs = vec![data.to_vec(), spliced];
    if let Ok(sealed) = seal(data, None) {
        inputs.push(sealed);
    }
    for input in inputs {
        if input == imp.real {
            continue;
        }
        assert!(
            imp.ctx.import(&input).is_err(),
            "an input not made with the key was accepted"
        );
        // Decoding with no key never panics either.
        let _ = PeerBlob::decode(&input, None);
    }
});
