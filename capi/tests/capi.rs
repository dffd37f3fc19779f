//! The C API from C: `tests/c/handoff.c` (a hand-off, every outcome
//! asserted) and `tests/c/racing.c` (a hand-off while the source keeps
//! writing from another thread) compiled with the system compiler against
//! the built library (the shared one plain, the static one under
//! AddressSanitizer and UBSan), and the checked-in header against what
//! cbindgen makes of the source now.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// Where cargo put libblkshim_capi.{so,a}: this test runs from
/// `<target>/<profile>/deps/`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    // `cargo test` links the tests against the rlib only: build the
    // cdylib and staticlib too (the same profile and target directory).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "blkshim-capi", "--lib"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo build -p blkshim-capi");
    assert!(status.success(), "cargo build -p blkshim-capi: {status}");
    assert!(
        dir.join("libblkshim_capi.so").exists() && dir.join("libblkshim_capi.a").exists(),
        "libblkshim_capi.so/.a not in {}",
        dir.display()
    );
    dir
}

/// Compiles tests/c/`prog`.c with `cc` and the extra `args`, runs it in a
/// fresh directory and checks it says ok with a clean stderr.
fn build_and_run(prog: &str, out: &Path, args: &[&str], env: &[(&str, &str)]) {
    let src = Path::new(MANIFEST).join(format!("tests/c/{prog}.c"));
    let status = Command::new("cc")
        .args([
            "-std=c11",
            "-D_GNU_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
        ])
        .arg("-I")
        .arg(Path::new(MANIFEST).join("include"))
        .arg(&src)
        .arg("-o")
        .arg(out)
        .args(args)
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc {args:?} failed");
    let work = tempfile::tempdir().unwrap();
    let run = Command::new(out)
        .arg(work.path())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        out.display(),
        run.status
    );
    assert!(stdout.contains(&format!("{prog}: ok")), "{stdout}");
    println!("{stdout}");
    // Sanitizer reports go to stderr, even for errors that do not abort.
    assert!(
        !stderr.contains("Sanitizer") && !stderr.contains("runtime error"),
        "sanitizer output:\n{stderr}"
    );
}

/// Linked against the shared library, as a toolstack would (-lblkshim_capi).
#[test]
fn c_programs_shared() {
    let lib = lib_dir();
    let dir = tempfile::tempdir().unwrap();
    let rpath = format!("-Wl,-rpath,{}", lib.display());
    let libdir = format!("-L{}", lib.display());
    for prog in ["handoff", "racing"] {
        build_and_run(
            prog,
            &dir.path().join(prog),
            &[&libdir, "-lblkshim_capi", "-lpthread", &rpath],
            &[],
        );
    }
}

/// Linked against the static library, under AddressSanitizer (with leak
/// checking) and UBSan: the C side's use of every handle, buffer and
/// string must be clean, and so must what the library frees for it.
#[test]
fn c_programs_static_asan() {
    let lib = lib_dir();
    let dir = tempfile::tempdir().unwrap();
    let a = lib.join("libblkshim_capi.a");
    for prog in ["handoff", "racing"] {
        build_and_run(
            prog,
            &dir.path().join(format!("{prog}-asan")),
            &[
                "-fsanitize=address,undefined",
                "-fno-omit-frame-pointer",
                "-fno-sanitize-recover=all",
                a.to_str().unwrap(),
                // rustc --print native-static-libs for this crate
                // (OpenSSL: the NBD server's TLS-PSK).
                "-lssl",
                "-lcrypto",
                "-lgcc_s",
                "-lutil",
                "-lrt",
                "-lpthread",
                "-lm",
                "-ldl",
                "-lc",
            ],
            &[
                ("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1"),
                ("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"),
            ],
        );
    }
}

/// include/blkshim.h is what cbindgen makes of src/lib.rs now (no drift).
/// `BLKSHIM_BLESS=1` rewrites it instead.
#[test]
fn header_is_current() {
    let root = Path::new(MANIFEST);
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/lib.rs"))
        .generate()
        .expect("cbindgen parses src/lib.rs");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).unwrap();
    let path = root.join("include/blkshim.h");
    if std::env::var_os("BLKSHIM_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{} is stale: regenerate with BLKSHIM_BLESS=1 cargo test -p blkshim-capi --test capi header",
        path.display()
    );
}
