//! Generates the Xen bindings (`$OUT_DIR/xen_bindings.rs`, plus the blkif
//! structures as laid out for an x86_32 and an x86_64 guest, whose layout
//! assertions the ABI tests read) with bindgen over the installed Xen public
//! and userspace headers. When libclang or the headers are missing, it copies
//! the pre-generated files from `vendor/` instead (and says so), so a plain
//! `cargo build` works anywhere. With feature `xen` it links the Xen
//! userspace libraries; with feature `sanlock`, libsanlock_client.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// Headers that must all be present to regenerate the bindings.
const REQUIRED_HEADERS: &[&str] = &[
    "xen/io/blkif.h",
    "xen/io/ring.h",
    "xen/io/protocols.h",
    "xen/grant_table.h",
    "xen/event_channel.h",
    "xenstore.h",
    "xengnttab.h",
    "xenevtchn.h",
];

/// The generated outputs, each with its wrapper header and clang target
/// (`None` = the host).
const OUTPUTS: &[(&str, &str, Option<&str>)] = &[
    ("xen_bindings.rs", "vendor/xen_wrapper.h", None),
    (
        "xen_blkif_x86_32.rs",
        "vendor/xen_blkif_abi.h",
        Some("i686-unknown-linux-gnu"),
    ),
    (
        "xen_blkif_x86_64.rs",
        "vendor/xen_blkif_abi.h",
        Some("x86_64-unknown-linux-gnu"),
    ),
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap_or_default());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=vendor");
    println!("cargo:rerun-if-env-changed=BLKSHIM_XEN_INCLUDE");
    println!("cargo:rerun-if-env-changed=BLKSHIM_XEN_NO_BINDGEN");

    if env::var_os("CARGO_FEATURE_XEN").is_some() {
        for lib in ["xenstore", "xengnttab", "xenevtchn"] {
            println!("cargo:rustc-link-lib={lib}");
        }
    }
    // The sanlock lease fence's client library (src/storage/fencing/sanlock/ffi.rs).
    if env::var_os("CARGO_FEATURE_SANLOCK").is_some() {
        println!("cargo:rustc-link-lib=sanlock_client");
    }

    let blocker = match generation_blocker() {
        None => generate_all(&manifest_dir, &out_dir).err(),
        Some(why) => Some(why),
    };
    let source = match &blocker {
        None => "generated",
        Some(why) => {
            fall_back(&manifest_dir, &out_dir, why);
            "vendor"
        }
    };
    // Lets tests/xen_bindings.rs know whether it can check vendor/ for drift,
    // and say why not when it cannot.
    println!("cargo:rustc-env=BLKSHIM_XEN_BINDINGS_SOURCE={source}");
    let why = blocker.unwrap_or_default().replace(['\n', '\r'], " ");
    println!("cargo:rustc-env=BLKSHIM_XEN_BINDINGS_WHY={why}");
}

/// Where the Xen headers live: `BLKSHIM_XEN_INCLUDE` or the system default.
fn include_dir() -> PathBuf {
    env::var_os("BLKSHIM_XEN_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"))
}

/// Why the bindings cannot be generated here, if they cannot.
fn generation_blocker() -> Option<String> {
    if env::var_os("BLKSHIM_XEN_NO_BINDGEN").is_some() {
        return Some("BLKSHIM_XEN_NO_BINDGEN is set".to_string());
    }
    let dir = include_dir();
    let missing: Vec<&str> = REQUIRED_HEADERS
        .iter()
        .copied()
        .filter(|h| !dir.join(h).exists())
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "Xen headers not found under {} (missing: {}; install libxen-dev or set BLKSHIM_XEN_INCLUDE)",
            dir.display(),
            missing.join(", ")
        ));
    }
    None
}

fn generate_all(manifest_dir: &Path, out_dir: &Path) -> Result<(), String> {
    for (name, header, target) in OUTPUTS {
        let text = generate(&manifest_dir.join(header), *target)?;
        fs::write(out_dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))?;
    }
    Ok(())
}

/// Runs bindgen over one wrapper header. A missing libclang makes bindgen
/// panic, so the panic is caught and turned into a fallback reason.
fn generate(header: &Path, target: Option<&str>) -> Result<String, String> {
    let header = header.to_string_lossy().into_owned();
    // -idirafter keeps clang's own (freestanding-capable) stdint.h first.
    let include = format!("-idirafter{}", include_dir().display());
    let target = target.map(|t| t.to_string());
    let run = move || {
        let mut builder = bindgen::Builder::default()
            .header(header)
            .clang_arg(include)
            .formatter(bindgen::Formatter::Prettyplease)
            .generate_comments(false)
            .layout_tests(true)
            .derive_default(true)
            .use_core()
            .allowlist_type("blkif_request.*")
            .allowlist_type("blkif_response.*")
            .allowlist_type("blkif_sring.*")
            .allowlist_var("BLKIF_.*")
            .allowlist_var("VDISK_.*")
            .allowlist_type("grant_ref_t")
            .allowlist_type("domid_t");
        if let Some(t) = &target {
            // Freestanding: a 32-bit glibc (multilib) is not needed for
            // the fixed-width types the blkif structures use.
            builder = builder
                .clang_arg(format!("--target={t}"))
                .clang_arg("-ffreestanding");
        } else {
            builder = builder
                .allowlist_type("blkif_.*")
                .allowlist_var("XEN_IO_PROTO_ABI_.*")
                .allowlist_var("XS_.*")
                .allowlist_var("XEN_GRANT_.*")
                .allowlist_var("GNTCOPY_.*")
                .allowlist_var("GNTST_.*")
                .allowlist_type("evtchn_port_t")
                .allowlist_type("xs_.*")
                .allowlist_function("xs_.*")
                .allowlist_type("xengnttab_.*")
                .allowlist_function("xengnttab_.*")
                .allowlist_type("xenevtchn_.*")
                .allowlist_function("xenevtchn_.*")
                .opaque_type("xentoollog_logger");
        }
        builder.generate().map(|b| b.to_string())
    };
    match std::panic::catch_unwind(run) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(format!("bindgen failed: {e}")),
        Err(_) => Err("bindgen panicked (is libclang installed?)".to_string()),
    }
}

/// Copies the pre-generated bindings from `vendor/` and warns why.
fn fall_back(manifest_dir: &Path, out_dir: &Path, why: &str) {
    println!("cargo:warning=blkshim: using pre-generated Xen bindings from vendor/: {why}");
    for (name, _, _) in OUTPUTS {
        let from = manifest_dir.join("vendor").join(name);
        if let Err(e) = fs::copy(&from, out_dir.join(name)) {
            println!("cargo:warning=blkshim: cannot copy {}: {e}", from.display());
        }
    }
}
