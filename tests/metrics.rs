//! `blkshim serve --metrics`: the Prometheus endpoint scraped with a plain
//! HTTP GET while fio loads the disk and after, checked against what fio
//! says it sent, `ctl status`, a stale-epoch connection and a fenced
//! writer's refused write; the endpoint's absence without the flag; a bad
//! address stopping the start.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The address the server logged for its metrics endpoint.
fn metrics_addr(srv: &Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = srv.log();
        if let Some(i) = log.find("metrics on http://") {
            let rest = &log[i + "metrics on http://".len()..];
            return rest[..rest.find('/').expect("url path")].to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.0 GET: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// One scrape: every sample by `name{labels}` as the server wrote it.
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    fn take(addr: &str) -> Scrape {
        let (code, text) = get(addr, "/metrics");
        assert_eq!(code, 200, "{text}");
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics: {text}");
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("line {l:?}"));
                (k.to_string(), v.parse().unwrap_or_else(|_| panic!("{l:?}")))
            })
            .collect();
        Scrape { samples, text }
    }

    /// The sample `key` (`name{labels}`, labels as the server orders them).
    fn v(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{}", self.text))
    }

    fn requests(&self, op: &str) -> f64 {
        self.v(&format!(
            "blkshim_requests_total{{disk=\"vm1\",op=\"{op}\"}}"
        ))
    }

    fn bytes(&self, op: &str) -> f64 {
        self.v(&format!("blkshim_bytes_total{{disk=\"vm1\",op=\"{op}\"}}"))
    }

    fn latency_count(&self, class: &str) -> f64 {
        self.v(&format!(
            "blkshim_request_duration_seconds_count{{disk=\"vm1\",class=\"{class}\"}}"
        ))
    }

    fn refused(&self, stage: &str) -> f64 {
        self.v(&format!(
            "blkshim_refused_stale_total{{disk=\"vm1\",stage=\"{stage}\"}}"
        ))
    }
}

/// Run fio on `uri`; returns (I/Os, bytes) of `dir` (`read` or `write`).
fn fio(uri: &str, dir: &str, extra: &[&str]) -> (f64, f64) {
    let out = run_ok(
        Command::new("fio")
            .args([
                "--name=metrics",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--output-format=json",
            ])
            .args(extra),
    );
    let text = stdout(&out);
    let json = &text[text.find('{').unwrap_or(0)..];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio json: {e}: {text}"));
    let j = &v["jobs"][0];
    assert_eq!(j["error"], 0, "fio job failed: {j}");
    let ios = j[dir]["total_ios"].as_f64().expect("total_ios");
    let bytes = j[dir]["io_bytes"].as_f64().expect("io_bytes");
    assert!(ios > 0.0 && bytes > 0.0, "fio did nothing: {j}");
    (ios, bytes)
}

#[test]
fn metrics_follow_the_load_and_the_epochs() {
    require("fio");
    require("qemu-io");
    let srv = Server::start(&["vm1"], "64M", &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&srv);
    let s0 = Scrape::take(&addr);
    assert_eq!(s0.v("blkshim_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(s0.v("blkshim_uptime_seconds") > 0.0);
    assert_eq!(s0.requests("write"), 0.0);
    assert_eq!(s0.v("blkshim_epoch{disk=\"vm1\"}"), 0.0);
    assert_eq!(get(&addr, "/").0, 404);
    assert_eq!(get(&addr, "/metricsx").0, 404);

    // Writes as vm1@1 (its first write advances the epoch: a hand-off),
    // scraped while fio runs.
    let uri = srv.uri("vm1@1");
    let u = uri.clone();
    let load = std::thread::spawn(move || {
        fio(
            &u,
            "write",
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=32M",
                "--time_based",
                "--runtime=3",
            ],
        )
    });
    let mut during = Vec::new();
    while !load.is_finished() {
        during.push(Scrape::take(&addr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (writes, written) = load.join().expect("fio thread");
    let s1 = Scrape::take(&addr);
    assert!(
        during.len() >= 3,
        "only {} scrapes during the load",
        during.len()
    );
    let seen: Vec<f64> = during.iter().map(|s| s.requests("write")).collect();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen.iter().any(|&n| n > 0.0 && n < writes),
        "no scrape saw the load under way: {seen:?} of {writes}"
    );
    assert!(
        s1.requests("write") >= writes,
        "{} < {writes}",
        s1.requests("write")
    );
    assert!(
        s1.bytes("write") >= written,
        "{} < {written}",
        s1.bytes("write")
    );

    // Reads.
    let (reads, read) = fio(
        &uri,
        "read",
        &["--rw=randread", "--bs=4k", "--iodepth=8", "--size=8M"],
    );
    // A flush, a trim and a write-zeroes (the class "other").
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "flush",
        "-c",
        "discard 0 64k",
        "-c",
        "write -z 64k 64k",
        &uri,
    ]));
    let s2 = Scrape::take(&addr);
    assert!(
        s2.requests("read") >= reads,
        "{} < {reads}",
        s2.requests("read")
    );
    assert!(s2.bytes("read") >= read, "{} < {read}", s2.bytes("read"));
    assert!(s2.requests("flush") >= 1.0);
    assert!(s2.requests("trim") >= 1.0);
    assert!(s2.requests("write_zeroes") >= 1.0);
    assert_eq!(s2.v("blkshim_in_flight{disk=\"vm1\"}"), 0.0);
    // Every request answered is in its latency histogram, once.
    assert_eq!(s2.latency_count("read"), s2.requests("read"));
    assert_eq!(s2.latency_count("write"), s2.requests("write"));
    let other: f64 = ["flush", "trim", "write_zeroes", "block_status"]
        .iter()
        .map(|op| s2.requests(op))
        .sum();
    assert_eq!(s2.latency_count("other"), other);
    assert_eq!(
        s2.v("blkshim_request_duration_seconds_bucket{le=\"+Inf\",disk=\"vm1\",class=\"write\"}"),
        s2.requests("write")
    );
    // The epoch is the one ctl status shows, moved by one hand-off.
    let st = srv.disk_status("vm1");
    assert_eq!(st["current_epoch"], 1);
    assert_eq!(s2.v("blkshim_epoch{disk=\"vm1\"}"), 1.0);
    assert_eq!(
        s2.v("blkshim_handoffs_total{disk=\"vm1\",method=\"advance\",outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(
        s2.v("blkshim_handoff_duration_seconds_count{disk=\"vm1\"}"),
        1.0
    );
    assert_eq!(s2.refused("connect"), 0.0);
    assert_eq!(s2.refused("request"), 0.0);

    // A connection below the current epoch is refused at the handshake.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4k", &srv.uri("vm1@0")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "stale epoch connected: {out:?}");
    let s3 = Scrape::take(&addr);
    assert!(s3.refused("connect") >= 1.0, "{}", s3.text);
    assert_eq!(
        s3.refused("connect") as u64,
        srv.disk_status("vm1")["refused_stale_writers"]
    );

    // A writer that is fenced by `ctl handoff` has its next write refused.
    let (mut old, _) = RawClient::go(&srv.socket, "vm1@1");
    // A writer registered at epoch 1 shows in the writers gauge.
    assert_eq!(
        Scrape::take(&addr).v("blkshim_writers{disk=\"vm1\",epoch=\"1\"}"),
        1.0
    );
    srv.ctl(&["handoff", "vm1"]);
    assert_ne!(
        old.write(7, 0, &[0xAB; 4096]),
        0,
        "the fenced write succeeded"
    );
    let s4 = Scrape::take(&addr);
    assert_eq!(s4.refused("request"), 1.0, "{}", s4.text);
    assert_eq!(
        s4.refused("request") as u64,
        srv.disk_status("vm1")["refused_stale"]
    );
    assert_eq!(s4.v("blkshim_epoch{disk=\"vm1\"}"), 2.0);
    assert_eq!(
        s4.v("blkshim_handoffs_total{disk=\"vm1\",method=\"advance\",outcome=\"ok\"}"),
        2.0
    );
    // The refused write is a write answered, with no bytes written.
    assert_eq!(s4.requests("write"), s2.requests("write") + 1.0);
    assert_eq!(s4.bytes("write"), s2.bytes("write"));
    assert_eq!(s4.latency_count("write"), s4.requests("write"));
    drop(old);
    if let Ok(path) = std::env::var("BLKSHIM_METRICS_EXAMPLE") {
        // The README's example scrape (see its Metrics section).
        std::fs::write(path, &s4.text).unwrap();
    }
}

/// TCP ports the process `pid` listens on, from /proc.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, ..., st (0A: LISTEN), ..., inode (field 9)
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

#[test]
fn metrics_are_off_by_default_and_a_bad_address_stops_the_start() {
    let srv = Server::start(&["vm1"], "8M", &[]);
    let pid = srv.child.as_ref().unwrap().id();
    assert_eq!(
        listening_ports(pid),
        Vec::<u16>::new(),
        "a TCP listener without --metrics"
    );
    assert!(!srv.log().contains("metrics on"));
    drop(srv);

    // With it, exactly one listener: the metrics endpoint, on loopback.
    let srv = Server::start(&["vm1"], "8M", &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&srv);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(
        listening_ports(srv.child.as_ref().unwrap().id()),
        vec![port]
    );
    drop(srv);

    // A bad address, a port taken: the server says so and exits.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    for bad in ["127.0.0.1:99999", taken_addr.as_str()] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .current_dir(dir.path())
            .args(["serve", "--size", "8M", "--metrics", bad, "vm1=vm1.img"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve --metrics {bad} did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success(), "serve --metrics {bad} started");
        assert!(err.contains(&format!("metrics {bad}")), "{err}");
        assert!(
            !dir.path().join("blkshim.sock").exists(),
            "served NBD anyway"
        );
    }
    drop(taken);
}
