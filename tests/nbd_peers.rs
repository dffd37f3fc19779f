//! `blkshim serve` against real NBD peers: qemu-img, qemu-io, nbdinfo,
//! nbdcopy and fio, over the unix socket and TCP, several at once.

mod common;

use common::*;
use std::process::Command;

#[test]
fn nbd_qemu_img_create_info_convert_compare() {
    require("qemu-img");
    let srv = Server::start(&["vm1"], "32M", &[]);
    let uri = srv.uri("vm1");
    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], 32 << 20);

    // A qcow2 image created inside the export, then inspected through it.
    run_ok(Command::new("qemu-img").args(["create", "-f", "qcow2", &uri, "16M"]));
    let info =
        run_ok(Command::new("qemu-img").args(["info", "--output=json", "-f", "qcow2", &uri]));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual-size"], 16 << 20);

    // Raw random data converted onto the export and compared back.
    let local = srv.path("local.raw");
    std::fs::write(&local, random_bytes(32 << 20, 7)).unwrap();
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        "-t",
        "none",
        local.to_str().unwrap(),
        &uri,
    ]));
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        local.to_str().unwrap(),
        &uri,
    ]));
    // And the bytes really are in the image file.
    assert_eq!(
        std::fs::read(srv.image("vm1")).unwrap(),
        std::fs::read(&local).unwrap()
    );
    // A different image must not compare equal (the comparison can fail).
    let other = srv.path("other.raw");
    let mut bytes = std::fs::read(&local).unwrap();
    bytes[12345] ^= 1;
    std::fs::write(&other, bytes).unwrap();
    let st = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other.to_str().unwrap(),
            &uri,
        ])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1));
}

#[test]
fn nbd_qemu_io_patterns_and_aio() {
    require("qemu-io");
    let srv = Server::start(&["vm1"], "64M", &[]);
    let uri = srv.uri("vm1");
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "aio_write -P 0x5a 0 1M",
        "-c",
        "aio_write -P 0xa5 2M 1M",
        "-c",
        "aio_write -P 0x33 4M 4k",
        "-c",
        "aio_write -P 0x44 8M 512",
        "-c",
        "aio_flush",
        "-c",
        "write -P 0x77 -f 16M 64k",
        "-c",
        "write -z 2M 64k",
        "-c",
        "discard 4M 4k",
        "-c",
        "flush",
        &uri,
    ]));
    assert!(!stdout(&out).contains("error"), "{}", stdout(&out));
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "read -P 0xa5 2112k 960k",
        "-c",
        "read -P 0 4M 4k",
        "-c",
        "read -P 0x44 8M 512",
        "-c",
        "aio_read -P 0x77 16M 64k",
        "-c",
        "aio_flush",
        &uri,
    ]));
    let text = stdout(&out);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(text.matches("read ").count(), 6, "{text}");
    // A mismatching pattern must be detected (the check can fail).
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x99 0 4k", &uri])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("Pattern verification failed"));
}

#[test]
fn nbd_nbdinfo_and_nbdcopy_round_trip() {
    require("nbdinfo");
    require("nbdcopy");
    let srv = Server::start(&["vm1", "vm2"], "48M", &[]);
    let info = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri("vm1")]));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 48 << 20);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let list = run_ok(Command::new("nbdinfo").args(["--list", "--json", &srv.uri("")]));
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm1", "vm2"]);

    let src = srv.path("src.bin");
    let back = srv.path("back.bin");
    std::fs::write(&src, random_bytes(48 << 20, 99)).unwrap();
    run_ok(Command::new("nbdcopy").args([
        "--connections=4",
        src.to_str().unwrap(),
        &srv.uri("vm2"),
    ]));
    run_ok(Command::new("nbdcopy").args([&srv.uri("vm2"), back.to_str().unwrap()]));
    let sum = |p: &std::path::Path| {
        let o = run_ok(Command::new("sha256sum").arg(p));
        stdout(&o).split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(sum(&src), sum(&back));
    assert_eq!(sum(&src), sum(&srv.image("vm2")));
    // vm1 untouched by writes to vm2.
    assert!(std::fs::read(srv.image("vm1"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

fn fio(uri: &str, extra: &[&str]) -> String {
    let mut c = Command::new("fio");
    c.args([
        "--name=blkshim",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--output-format=json",
        "--verify_state_save=0",
    ])
    .args(extra);
    let out = run_ok(&mut c);
    // fio's nbd engine prints "connected to NBD server" lines before the JSON.
    let text = stdout(&out);
    let json = &text[text.find('{').unwrap_or(0)..];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio json: {e}: {text}"));
    for j in v["jobs"].as_array().unwrap() {
        assert_eq!(j["error"], 0, "fio job failed: {j}");
    }
    text
}

/// The default set-up: io_uring through the page cache; small writes and
/// cached reads are done inline, the rest on the connection's own ring.
#[test]
fn nbd_fio_verify_crc32c_several_connections() {
    let log = fio_verify_several_connections(&[]).log();
    assert!(
        log.contains("io_uring engine") && log.contains("direct=false"),
        "{log}"
    );
}

/// O_DIRECT: every request on the connection's own ring.
#[test]
fn nbd_fio_verify_crc32c_o_direct() {
    let log = fio_verify_several_connections(&["--cache", "none"]).log();
    assert!(
        log.contains("io_uring engine") && log.contains("direct=true"),
        "{log}"
    );
}

/// The thread-pool engine has no per-connection queue: completions come
/// from its threads and replies go out directly or via the writer thread.
#[test]
fn nbd_fio_verify_crc32c_thread_pool() {
    let log = fio_verify_several_connections(&["--engine", "thread-pool"]).log();
    assert!(log.contains("thread-pool engine"), "{log}");
}

fn fio_verify_several_connections(serve_args: &[&str]) -> Server {
    require("fio");
    let srv = Server::start(&["vm1"], "64M", serve_args);
    let uri = srv.uri("vm1");
    // One connection, deep queue, verified.
    fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    // Four connections at once on disjoint ranges, mixed sizes, verified.
    fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=8M",
            "--offset_increment=8M",
            "--offset=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    let st = srv.disk_status("vm1");
    assert!(st["completed"].as_u64().unwrap() > 4000, "{st}");
    assert_eq!(st["refused_stale"], 0);
    srv
}

#[test]
fn nbd_parallel_qemu_io_clients_and_tcp() {
    require("qemu-io");
    require("nbdinfo");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // Plain TCP: this test is about TCP, not TLS (tests/nbd_tls.rs).
    let srv = Server::start(&["vm1"], "32M", &["--listen", &listen, "--tls", "off"]);
    let mut kids = Vec::new();
    for i in 0..6u32 {
        let uri = if i % 2 == 0 {
            srv.uri("vm1")
        } else {
            format!("nbd://{listen}/vm1")
        };
        kids.push(
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("aio_write -P {} {}M 1M", 0x10 + i, i * 2),
                    "-c",
                    "aio_flush",
                    &uri,
                ])
                .output()
                .unwrap(),
        );
    }
    for k in &kids {
        assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    }
    let img = std::fs::read(srv.image("vm1")).unwrap();
    for i in 0..6usize {
        let at = (i * 2) << 20;
        assert!(
            img[at..at + (1 << 20)].iter().all(|&b| b == 0x10 + i as u8),
            "region {i}"
        );
    }
    let info = run_ok(Command::new("nbdinfo").args(["--size", &format!("nbd://{listen}/vm1")]));
    assert_eq!(stdout(&info).trim(), (32u64 << 20).to_string());
}

#[test]
fn nbd_sigterm_flushes_and_exits_zero() {
    require("qemu-io");
    let mut srv = Server::start(&["vm1"], "8M", &[]);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x42 0 64k",
        &srv.uri("vm1"),
    ]));
    assert_eq!(srv.stop(), Some(0));
    assert!(!srv.socket.exists(), "socket removed on exit");
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..65536].iter().all(|&b| b == 0x42));
}

#[test]
fn nbd_config_file_and_direct_io() {
    require("qemu-io");
    // O_DIRECT needs a real file system (tmpfs refuses it and the engine
    // would honestly fall back to buffered I/O): use the target directory.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(
        dir.path().join("blkshim.toml"),
        format!("cache = \"none\"\nfence_timeout = \"2s\"\n[[disk]]\nname = \"alpha\"\npath = \"{d}/a.raw\"\nsize = \"4M\"\n[[disk]]\npath = \"{d}/beta.raw\"\nsize = 8388608\n"),
    )
    .unwrap();
    let srv = Server::start_in(dir, &[], "1M", &["--config", "{dir}/blkshim.toml"]);
    for (name, size) in [("alpha", 4u64 << 20), ("beta", 8 << 20)] {
        let uri = srv.uri(name);
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x61 4k 8k", &uri]));
        let out = run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0x61 4k 8k",
            "-c",
            "read -P 0 0 4k",
            &uri,
        ]));
        assert!(
            !stdout(&out).contains("verification failed"),
            "{}",
            stdout(&out)
        );
        assert_eq!(
            std::fs::metadata(srv.path(if name == "alpha" { "a.raw" } else { "beta.raw" }))
                .unwrap()
                .len(),
            size
        );
    }
    // O_DIRECT mode advertises the file system's direct-I/O alignment
    // (statx DIOALIGN: 512 on ext4 here) as the minimum block size.
    require("nbdinfo");
    let info = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri("alpha")]));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let min = v["exports"][0]["block_size_minimum"].as_u64().unwrap();
    assert!(min == 512 || min == 4096, "minimum block size {min}");
    assert_eq!(v["exports"][0]["block_size_preferred"], 4096);
}

#[test]
fn nbd_block_status_base_allocation() {
    require("qemu-io");
    require("nbdinfo");
    require("qemu-img");
    let srv = Server::start(&["vm1"], "64M", &[]);
    let uri = srv.uri("vm1");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 1 1M 64k",
        "-c",
        "write -P 2 10M 4k",
        &uri,
    ]));
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 1 << 20, 3),
            (1 << 20, 65536, 0),
            ((1 << 20) + 65536, (9 << 20) - 65536, 3),
            (10 << 20, 4096, 0),
            ((10 << 20) + 4096, (54 << 20) - 4096, 3),
        ]
    );
    // Trim punches a hole that block status then reports.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 1M 64k", &uri]));
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["start"].as_u64().unwrap())
        .collect();
    assert_eq!(data, vec![10 << 20]);
}
