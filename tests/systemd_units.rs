//! The systemd units of `packaging/systemd/` pass `systemd-analyze verify`
//! (systemd's own parser: unknown keys, bad values, a missing ExecStart
//! binary, dependency cycles), checked in a scratch root where
//! /usr/bin/blkshim is the binary just built and /etc/systemd/system holds
//! the units, so it runs without systemd as PID 1 and without installing.
//! `systemd-analyze` must be installed (Debian: `systemd`; tests/all.sh
//! installs it): a missing tool fails loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_blkshim");
const UNITS: [&str; 2] = ["blkshim-serve@.service", "blkshim-xen-backend.service"];

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd")
}

/// A scratch root with the system's own units (what ours order against),
/// our units, and `binary` as /usr/bin/blkshim when given.
fn scratch_root(binary: Option<&str>) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    // -a keeps the symlinks (aliases) as they are, resolved inside the root.
    let st = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(st.success(), "copying /usr/lib/systemd/system");
    for u in UNITS {
        std::fs::copy(units_dir().join(u), r.join("etc/systemd/system").join(u)).unwrap();
    }
    if let Some(b) = binary {
        std::fs::copy(b, r.join("usr/bin/blkshim")).unwrap();
    }
    root
}

/// `systemd-analyze verify --root` of `units` (names as systemctl takes
/// them: the template is checked through an instance): (success, stderr).
fn verify(root: &Path, units: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        // The man pages are the package's (tests/package_deb.sh checks them).
        .arg("--man=no")
        .arg(format!("--root={}", root.display()))
        .args(units)
        .output()
        .expect("systemd-analyze not found: install the systemd package (tests/all.sh does)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const INSTANCES: [&str; 2] = [
    "blkshim-serve@example.service",
    "blkshim-xen-backend.service",
];

/// Both units verify clean: exit 0 and not one warning.
#[test]
fn units_verify_clean() {
    let root = scratch_root(Some(BIN));
    let (ok, err) = verify(root.path(), &INSTANCES);
    assert!(
        ok && err.trim().is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

/// The negative control: verify does catch a unit that cannot start (no
/// binary at ExecStart) and an unknown key, so the clean run above means
/// something.
#[test]
fn verify_catches_broken_units() {
    let root = scratch_root(None);
    let (ok, err) = verify(root.path(), &INSTANCES);
    assert!(!ok && err.contains("/usr/bin/blkshim"), "{err}");

    let root = scratch_root(Some(BIN));
    let unit = root.path().join("etc/systemd/system").join(UNITS[0]);
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&unit, text.replace("ProtectHome=", "ProtectHomme=")).unwrap();
    let (_, err) = verify(root.path(), &INSTANCES[..1]);
    assert!(err.contains("ProtectHomme"), "{err}");
}

/// What the daemons rely on: systemd waits for READY=1 (Type=notify), stops
/// them with SIGTERM (serve's drain), and gives the drain more time than its
/// deadline (fence_timeout 5 s + 5 s + a flush).
#[test]
fn units_match_the_daemons() {
    for u in UNITS {
        let text = std::fs::read_to_string(units_dir().join(u)).unwrap();
        let keys: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        for want in ["Type=notify", "KillSignal=SIGTERM", "NoNewPrivileges=yes"] {
            assert!(keys.contains(&want), "{u}: no {want}");
        }
        let stop: u64 = keys
            .iter()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .and_then(|v| v.trim_end_matches('s').parse().ok())
            .unwrap_or_else(|| panic!("{u}: no TimeoutStopSec in seconds"));
        assert!(
            stop >= 30,
            "{u}: TimeoutStopSec={stop}s is shorter than a drain"
        );
    }
}
