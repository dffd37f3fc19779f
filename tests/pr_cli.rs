//! `blkshim pr` on the host, without a PR-capable device: arguments, the
//! JSON of a refusal, and the exit status. (The device side runs in a qemu
//! guest: tests/pr_lio.rs through qemu-harness/hostside.sh.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_blkshim");

fn pr(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(BIN)
        .arg("pr")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_regular_file_is_refused_with_json() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let p = f.path().to_str().unwrap();
    for args in [
        vec![p, "keys"],
        vec![p, "reservation"],
        vec![p, "register", "epoch:3"],
        vec![p, "preempt", "0x626b730000000002", "epoch:1"],
        vec![p, "takeover", "7", "--no-abort"],
    ] {
        let (code, v, stderr) = pr(&args);
        assert_eq!(code, 1, "{args:?}: {v} {stderr}");
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["kind"], "io", "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("not a block device"),
            "{v}"
        );
        assert_eq!(v["device"], p);
        assert_eq!(v["command"], args[1]);
    }
}

#[test]
fn a_character_device_is_refused() {
    let (code, v, _) = pr(&["/dev/null", "keys"]);
    assert_eq!(
        (code, &v["ok"], &v["kind"]),
        (1, &false.into(), &"io".into()),
        "{v}"
    );
    let (code, v, _) = pr(&["/nonexistent-blkshim-dev", "reservation"]);
    assert_eq!(code, 1);
    assert_eq!(v["errno"], libc::ENOENT, "{v}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        vec!["/dev/null", "takeover", "seven"],
        vec!["/dev/null", "reserve", "1", "--type", "everyone"],
        vec!["/dev/null", "frobnicate"],
        vec!["/dev/null"],
    ] {
        let (code, _, stderr) = pr(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
    let out = Command::new(BIN).args(["pr", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "keys",
        "reservation",
        "register",
        "reserve",
        "preempt",
        "release",
        "clear",
        "takeover",
    ] {
        assert!(help.contains(word), "{word} missing from\n{help}");
    }
}
