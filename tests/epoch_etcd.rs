//! The etcd epoch store against real etcd (`/usr/bin/etcd`, Debian's
//! etcd-server; tests/all.sh installs it): one member, three members, the
//! leader killed mid-run, quorum lost, and many concurrent advancers whose
//! history is checked for linearizability (tests/linearizability).
//!
//! Every member runs on free loopback ports in a temp dir and is killed when
//! the test ends; the packaged etcd.service is never used.

mod common;
mod etcd_cluster;
mod linearizability;

use etcd_cluster::Cluster;

use blkshim::epoch::etcd::EtcdTimeouts;
use blkshim::epoch::{EpochError, EpochStore, EtcdEpochStore};
use linearizability::{check, extra_checks, Call, Op, Ret};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The basic semantics on any cluster.
fn basic_semantics(c: &Cluster) {
    let s = c.store("/t-basic");
    assert_eq!(s.current("vm1").unwrap(), 0);
    // 0 -> 1 creates the key (create_revision 0).
    assert_eq!(s.compare_and_advance("vm1", 0).unwrap(), 1);
    // A stale contender loses and learns the current epoch.
    match s.compare_and_advance("vm1", 0) {
        Err(EpochError::Conflict { current: 1, .. }) => {}
        other => panic!("stale advance: {other:?}"),
    }
    match s.compare_and_advance("vm2", 3) {
        Err(EpochError::Conflict { current: 0, .. }) => {}
        other => panic!("advance of an absent disk from 3: {other:?}"),
    }
    // Past 9 -> 10 (bytewise "10" < "9": values are never compared).
    for e in 1..12 {
        assert_eq!(s.compare_and_advance("vm1", e).unwrap(), e + 1);
    }
    match s.compare_and_advance("vm1", 9) {
        Err(EpochError::Conflict { current: 12, .. }) => {}
        other => panic!("stale advance from 9: {other:?}"),
    }
    // Another handle (another host), each endpoint alone, sees it.
    for ep in c.endpoints() {
        let t = EtcdEpochStore::new(&[ep], "/t-basic").unwrap();
        assert_eq!(t.current("vm1").unwrap(), 12);
    }
    // Prefixes are separate stores.
    assert_eq!(c.store("/t-other").current("vm1").unwrap(), 0);
    assert!(matches!(s.current("../x"), Err(EpochError::BadName(_))));
}

#[test]
fn single_member() {
    let c = Cluster::start(1);
    basic_semantics(&c);
}

#[test]
fn three_members() {
    let c = Cluster::start(3);
    basic_semantics(&c);
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every thread and process
/// of the machine, so histories of several processes merge.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `clients` threads (numbered from `first_client`), each with its own
/// store (its own host), reading and advancing `disk` until `ops`
/// operations each, or `deadline`. Errors with no effect (a read that
/// failed, an advance refused before it was sent) are left out of the
/// history; unknown outcomes stay in it, never returned.
fn run_workload(
    endpoints: &[String],
    prefix: &str,
    disk: &str,
    (first_client, clients): (usize, usize),
    ops: usize,
    deadline: Duration,
) -> (Vec<Op>, usize) {
    run_workload_paced(
        endpoints,
        prefix,
        disk,
        (first_client, clients),
        ops,
        deadline,
        Duration::ZERO,
    )
}

/// Doubtful attempts and advances won by an earlier send, over every
/// client of this process.
static DOUBTFUL: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// As [`run_workload`], pausing `pause` between a client's iterations (a
/// run that lasts until `deadline` across a fault).
fn run_workload_paced(
    endpoints: &[String],
    prefix: &str,
    disk: &str,
    (first_client, clients): (usize, usize),
    ops: usize,
    deadline: Duration,
    pause: Duration,
) -> (Vec<Op>, usize) {
    // Each client starts at a different endpoint and fails over to the rest.
    let plan = (first_client..first_client + clients)
        .map(|client| {
            let order = endpoints
                .iter()
                .cycle()
                .skip(client)
                .take(endpoints.len())
                .cloned()
                .collect();
            (client, order, DEFAULT_TIMEOUTS)
        })
        .collect();
    run_clients(plan, prefix, disk, ops, deadline, pause)
}

const DEFAULT_TIMEOUTS: EtcdTimeouts = EtcdTimeouts {
    request: Duration::from_secs(5),
    call: Duration::from_secs(15),
};

/// The clients of [`run_workload_paced`], each `(number, endpoints,
/// timeouts)`.
fn run_clients(
    plan: Vec<(usize, Vec<String>, EtcdTimeouts)>,
    prefix: &str,
    disk: &str,
    ops: usize,
    deadline: Duration,
    pause: Duration,
) -> (Vec<Op>, usize) {
    let history = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let start = Instant::now();
    std::thread::scope(|sc| {
        for (client, endpoints, timeouts) in plan {
            let history = history.clone();
            let errors = errors.clone();
            sc.spawn(move || {
                let s = EtcdEpochStore::with_timeouts(&endpoints, prefix, timeouts).unwrap();
                let mut done = 0;
                while done < ops && start.elapsed() < deadline {
                    let t0 = now_ns();
                    let cur = match s.current(disk) {
                        Ok(v) => v,
                        Err(_) => {
                            *errors.lock().unwrap() += 1;
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    let t1 = now_ns();
                    let read = Op {
                        client,
                        call: Call::Read,
                        ret: Ret::Value(cur),
                        invoked: t0,
                        returned: Some(t1),
                    };
                    // Sometimes a stale expectation, to exercise conflicts.
                    let expected = if done % 5 == 4 && cur > 0 {
                        cur - 1
                    } else {
                        cur
                    };
                    let t2 = now_ns();
                    let r = s.compare_and_advance(disk, expected);
                    let t3 = now_ns();
                    let call = Call::Advance { expected };
                    let adv = match r {
                        Ok(e) => Some((Ret::Advanced(e), Some(t3))),
                        Err(EpochError::Conflict { current, .. }) => {
                            Some((Ret::Conflict(current), Some(t3)))
                        }
                        Err(EpochError::Unknown { .. }) => Some((Ret::Unknown, None)),
                        Err(_) => {
                            *errors.lock().unwrap() += 1;
                            None
                        }
                    };
                    let mut h = history.lock().unwrap();
                    h.push(read);
                    if let Some((ret, returned)) = adv {
                        h.push(Op {
                            client,
                            call,
                            ret,
                            invoked: t2,
                            returned,
                        });
                    }
                    drop(h);
                    done += 1;
                    std::thread::sleep(pause);
                }
                let (d, w) = s.doubtful_stats();
                let mut g = DOUBTFUL.lock().unwrap();
                g.0 += d;
                g.1 += w;
            });
        }
    });
    let h = history.lock().unwrap().clone();
    let e = *errors.lock().unwrap();
    (h, e)
}

/// One history line of a worker process.
fn encode_op(o: &Op) -> String {
    let (call, expected) = match o.call {
        Call::Read => ("read", 0),
        Call::Advance { expected } => ("advance", expected),
    };
    let (ret, v) = match o.ret {
        Ret::Value(v) => ("value", v),
        Ret::Advanced(v) => ("advanced", v),
        Ret::Conflict(v) => ("conflict", v),
        Ret::Unknown => ("unknown", 0),
    };
    format!(
        "HISTORY {} {call} {expected} {ret} {v} {} {}",
        o.client,
        o.invoked,
        o.returned.map_or("-".to_string(), |r| r.to_string())
    )
}

fn decode_op(line: &str) -> Option<Op> {
    let f: Vec<&str> = line.strip_prefix("HISTORY ")?.split(' ').collect();
    if f.len() != 8 {
        return None;
    }
    let n = |s: &str| s.parse::<u64>().ok();
    let call = match f[1] {
        "read" => Call::Read,
        _ => Call::Advance { expected: n(f[2])? },
    };
    let ret = match f[3] {
        "value" => Ret::Value(n(f[4])?),
        "advanced" => Ret::Advanced(n(f[4])?),
        "conflict" => Ret::Conflict(n(f[4])?),
        _ => Ret::Unknown,
    };
    Some(Op {
        client: f[0].parse().ok()?,
        call,
        ret,
        invoked: n(f[5])?,
        returned: if f[6] == "-" { None } else { Some(n(f[6])?) },
    })
    .filter(|_| f[7] == "end")
}

/// Not a test on its own: the body of a worker process of
/// `concurrent_processes`, configured by BLKSHIM_ETCD_WORKER
/// (`ENDPOINTS PREFIX DISK FIRST_CLIENT CLIENTS OPS`).
#[test]
#[ignore = "a worker process of concurrent_processes"]
fn etcd_worker_process() {
    let Ok(cfg) = std::env::var("BLKSHIM_ETCD_WORKER") else {
        return;
    };
    let f: Vec<&str> = cfg.split(' ').collect();
    let endpoints: Vec<String> = f[0].split(',').map(str::to_string).collect();
    let (h, errors) = run_workload(
        &endpoints,
        f[1],
        f[2],
        (f[3].parse().unwrap(), f[4].parse().unwrap()),
        f[5].parse().unwrap(),
        Duration::from_secs(240),
    );
    // On a line of its own: libtest printed "test ... " before.
    let mut out = String::from("\n");
    for o in &h {
        out += &encode_op(o);
        out += " end\n";
    }
    out += &format!("ERRORS {errors}\n");
    print!("{out}");
}

fn summarize(h: &[Op]) -> (usize, usize, usize) {
    let ok = h
        .iter()
        .filter(|o| matches!(o.ret, Ret::Advanced(_)))
        .count();
    let conflict = h
        .iter()
        .filter(|o| matches!(o.ret, Ret::Conflict(_)))
        .count();
    let unknown = h.iter().filter(|o| o.ret == Ret::Unknown).count();
    (ok, conflict, unknown)
}

/// Checks a history and the final epoch; prints a summary.
fn verify(name: &str, mut h: Vec<Op>, final_epoch: u64, final_at: (u64, u64), errors: usize) {
    let (ok, conflict, unknown) = summarize(&h);
    let (doubtful, won_earlier) = std::mem::take(&mut *DOUBTFUL.lock().unwrap());
    eprintln!(
        "{name}: {} ops: {ok} advanced, {conflict} conflicts, {unknown} unknown, {errors} failed without effect; final epoch {final_epoch}; {doubtful} doubtful HTTP attempts, {won_earlier} advances won by an earlier send (this process)",
        h.len()
    );
    let bad = extra_checks(&h);
    assert!(bad.is_empty(), "{name}: {bad:?}");
    assert!(ok > 0, "{name}: no advance succeeded");
    assert!(
        final_epoch as usize >= ok && final_epoch as usize <= ok + unknown,
        "{name}: final epoch {final_epoch}, {ok} successes, {unknown} unknown"
    );
    // The final read is part of the history.
    h.push(Op {
        client: usize::MAX,
        call: Call::Read,
        ret: Ret::Value(final_epoch),
        invoked: final_at.0,
        returned: Some(final_at.1),
    });
    let t = Instant::now();
    assert!(check(&h, 0), "{name}: history not linearizable: {h:#?}");
    eprintln!("{name}: linearizable (checked in {:?})", t.elapsed());
}

#[test]
fn concurrent_advancers_three_members() {
    let c = Cluster::start(3);
    let (h, errors) = run_workload(
        &c.endpoints(),
        "/t-conc",
        "vm1",
        (0, 6),
        40,
        Duration::from_secs(240),
    );
    let t0 = now_ns();
    let fin = c.store("/t-conc").current("vm1").unwrap();
    let t1 = now_ns();
    verify("concurrent, 3 members", h, fin, (t0, t1), errors);
}

#[test]
fn concurrent_processes() {
    let c = Cluster::start(3);
    let exe = std::env::current_exe().expect("test binary");
    let endpoints = c.endpoints().join(",");
    // Three worker processes of two threads each, and two threads here.
    let children: Vec<_> = (0..3)
        .map(|p| {
            Command::new(&exe)
                .args(["--exact", "etcd_worker_process", "--ignored", "--nocapture"])
                .env(
                    "BLKSHIM_ETCD_WORKER",
                    format!("{endpoints} /t-proc vm1 {} 2 25", 10 + 2 * p),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("worker process")
        })
        .collect();
    let (mut h, mut errors) = run_workload(
        &c.endpoints(),
        "/t-proc",
        "vm1",
        (0, 2),
        25,
        Duration::from_secs(240),
    );
    for child in children {
        let out = child.wait_with_output().expect("worker");
        assert!(out.status.success(), "worker failed: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut n = 0;
        for line in text.lines() {
            if let Some(o) = decode_op(line) {
                h.push(o);
                n += 1;
            } else if let Some(e) = line.strip_prefix("ERRORS ") {
                errors += e.trim().parse::<usize>().unwrap_or(0);
            }
        }
        assert!(n > 0, "a worker process recorded nothing:\n{text}");
    }
    let t0 = now_ns();
    let fin = c.store("/t-proc").current("vm1").unwrap();
    let t1 = now_ns();
    verify(
        "3 processes + 2 threads, 3 members",
        h,
        fin,
        (t0, t1),
        errors,
    );
}

#[test]
fn leader_killed_mid_run() {
    let mut c = Cluster::start(3);
    let endpoints = c.endpoints();
    let result = std::thread::scope(|sc| {
        let w = sc.spawn(|| {
            run_workload_paced(
                &endpoints,
                "/t-leader",
                "vm1",
                (0, 4),
                usize::MAX,
                Duration::from_secs(20),
                Duration::from_millis(50),
            )
        });
        // Let the run get going, then kill the leader.
        std::thread::sleep(Duration::from_secs(4));
        let leader = c.leader().expect("a leader");
        eprintln!("killing the leader, {}", c.members[leader].name);
        c.kill(leader);
        let killed_at = now_ns();
        (w.join().expect("workload"), leader, killed_at)
    });
    let ((h, errors), leader, killed_at) = result;
    let after = h
        .iter()
        .filter(|o| matches!(o.ret, Ret::Advanced(_)) && o.invoked > killed_at)
        .count();
    assert!(
        after > 0,
        "no advance succeeded after the leader was killed\n{}",
        c.logs()
    );
    let t0 = now_ns();
    let fin = c.store("/t-leader").current("vm1").unwrap();
    let t1 = now_ns();
    verify("leader killed", h, fin, (t0, t1), errors);
    // The old leader comes back and catches up.
    c.restart(leader);
    c.wait_healthy(Duration::from_secs(90));
    let ep = c.endpoints()[leader].clone();
    let back = EtcdEpochStore::new(&[ep], "/t-leader").unwrap();
    assert_eq!(back.current("vm1").unwrap(), fin);
}

/// The leader frozen (SIGSTOP) for a while mid-run, then thawed: the
/// requests sent to it time out after they left (doubtful outcomes that
/// the store resolves), a new leader is elected, and the old one serves
/// the stale requests it had buffered when it wakes up.
#[test]
fn leader_frozen_mid_run() {
    let c = Cluster::start(3);
    let endpoints = c.endpoints();
    let (h, errors) = std::thread::scope(|sc| {
        let w = sc.spawn(|| {
            run_workload_paced(
                &endpoints,
                "/t-frozen",
                "vm1",
                (0, 4),
                usize::MAX,
                Duration::from_secs(25),
                Duration::from_millis(50),
            )
        });
        std::thread::sleep(Duration::from_secs(4));
        let leader = c.leader().expect("a leader");
        eprintln!("freezing the leader, {}", c.members[leader].name);
        c.freeze(leader, true);
        std::thread::sleep(Duration::from_secs(8));
        c.freeze(leader, false);
        eprintln!("thawed {}", c.members[leader].name);
        w.join().expect("workload")
    });
    c.wait_healthy(Duration::from_secs(90));
    let t0 = now_ns();
    let fin = c.store("/t-frozen").current("vm1").unwrap();
    let t1 = now_ns();
    verify("leader frozen", h, fin, (t0, t1), errors);
}

/// A member cut off from its peers by nftables in its own network
/// namespace, the leader when the cut comes, while clients still reach it:
/// two clients keep to that member only, two to the others. The majority
/// advances during the cut; the member cut off completes nothing (a
/// linearizable read or an advance needs a quorum), and after the heal it
/// catches up; the whole history is linearizable. Runs itself again in a
/// private network and mount namespace (`unshare`), where the members'
/// namespaces, the bridge and the rules live and die with it.
#[test]
fn member_cut_off_by_nftables() {
    for tool in ["unshare", "nft", "ip"] {
        common::require(tool);
    }
    let exe = std::env::current_exe().expect("test binary");
    let _turn = etcd_cluster::exclusive();
    let out = Command::new("unshare")
        .args(["--net", "--mount", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "etcd_cut_off_in_netns",
            "--ignored",
            "--nocapture",
        ])
        .env("BLKSHIM_ETCD_NETNS", "1")
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}{}", text, String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the namespaced run failed: {}",
        out.status
    );
    assert!(
        text.contains("CUT-OFF-CHECKED"),
        "the namespaced run did not check"
    );
}

#[test]
#[ignore = "runs in a private network namespace, started by member_cut_off_by_nftables"]
fn etcd_cut_off_in_netns() {
    if std::env::var("BLKSHIM_ETCD_NETNS").is_err() {
        return;
    }
    let c = Cluster::start_netns(3, &format!("bk{}", std::process::id()));
    let endpoints = c.endpoints();
    let victim = c.leader().expect("a leader");
    let rest: Vec<String> = (0..endpoints.len())
        .filter(|&i| i != victim)
        .map(|i| endpoints[i].clone())
        .collect();
    // The cut-off member's clients give up sooner: the cut lasts 12 s.
    let short = EtcdTimeouts {
        request: Duration::from_secs(2),
        call: Duration::from_secs(5),
    };
    let mut plan = vec![
        (0, rest.clone(), DEFAULT_TIMEOUTS),
        (1, rest.iter().rev().cloned().collect(), DEFAULT_TIMEOUTS),
    ];
    plan.push((2, vec![endpoints[victim].clone()], short));
    plan.push((3, vec![endpoints[victim].clone()], short));
    let ((h, errors), cut_at, healed_at, stale) = std::thread::scope(|sc| {
        let w = sc.spawn(|| {
            run_clients(
                plan,
                "/t-cut",
                "vm1",
                usize::MAX,
                Duration::from_secs(30),
                Duration::from_millis(50),
            )
        });
        std::thread::sleep(Duration::from_secs(4));
        eprintln!("cutting off the leader, {}", c.members[victim].name);
        c.cut_off(victim, true);
        let cut_at = now_ns();
        std::thread::sleep(Duration::from_secs(10));
        let stale = serializable_read(&endpoints[victim], "/t-cut/epoch/vm1");
        std::thread::sleep(Duration::from_secs(2));
        c.cut_off(victim, false);
        let healed_at = now_ns();
        eprintln!("healed {}", c.members[victim].name);
        (w.join().expect("workload"), cut_at, healed_at, stale)
    });
    let within = |o: &Op| o.invoked >= cut_at && o.returned.is_some_and(|r| r <= healed_at);
    let majority_advanced = h
        .iter()
        .filter(|o| o.client < 2 && matches!(o.ret, Ret::Advanced(_)) && within(o))
        .count();
    let cut_completed: Vec<&Op> = h
        .iter()
        .filter(|o| o.client >= 2 && within(o) && o.ret != Ret::Unknown)
        .collect();
    eprintln!(
        "during the cut: {majority_advanced} advances by the majority's clients, {} operations completed through the member cut off",
        cut_completed.len()
    );
    assert!(
        majority_advanced > 0,
        "the majority made no progress\n{}",
        c.logs()
    );
    assert!(
        cut_completed.is_empty(),
        "a member cut off from its quorum completed operations: {cut_completed:?}"
    );
    let late = h
        .iter()
        .filter(|o| o.client >= 2 && o.invoked > healed_at && o.returned.is_some())
        .count();
    assert!(
        late > 0,
        "the member never served again after the heal\n{}",
        c.logs()
    );
    c.wait_healthy(Duration::from_secs(90));
    let t0 = now_ns();
    let fin = c.store("/t-cut").current("vm1").unwrap();
    let t1 = now_ns();
    // The negative control: the cut-off member, asked for a serializable
    // (local, no quorum) read, answers an epoch the majority had already
    // advanced past, and the checker rejects a history with that read.
    let mut with_stale = h.clone();
    with_stale.push(stale);
    let newest_before = h
        .iter()
        .filter_map(|o| match o.ret {
            Ret::Advanced(e) if o.returned.is_some_and(|r| r < stale.invoked) => Some(e),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    eprintln!("serializable read from the member cut off: {:?}, the majority had advanced to {newest_before}", stale.ret);
    assert!(
        matches!(stale.ret, Ret::Value(v) if v < newest_before),
        "the cut-off member's local read was not stale: {stale:?}, newest {newest_before}"
    );
    assert!(
        !check(&with_stale, 0),
        "the checker accepted a stale read from a member cut off"
    );
    verify("leader cut off by nftables", h, fin, (t0, t1), errors);
    println!("\nCUT-OFF-CHECKED");
}

/// A serializable range of `key` at `endpoint`: answered from that
/// member's own state, without a quorum, as a history read.
fn serializable_read(endpoint: &str, key: &str) -> Op {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({ "key": b64.encode(key), "serializable": true });
    let t0 = now_ns();
    let text = ureq::post(&format!("http://{endpoint}/v3/kv/range"))
        .timeout(Duration::from_secs(5))
        .send_string(&body.to_string())
        .expect("a serializable read from the member cut off")
        .into_string()
        .expect("a reply");
    let reply: serde_json::Value = serde_json::from_str(&text).expect("json");
    let t1 = now_ns();
    let value = reply["kvs"][0]["value"]
        .as_str()
        .map(|v| b64.decode(v).expect("base64"))
        .map(|v| {
            String::from_utf8_lossy(&v)
                .parse::<u64>()
                .expect("an epoch")
        })
        .unwrap_or(0);
    Op {
        client: 99,
        call: Call::Read,
        ret: Ret::Value(value),
        invoked: t0,
        returned: Some(t1),
    }
}

#[test]
fn quorum_lost_fails_in_time_and_never_succeeds() {
    let mut c = Cluster::start(3);
    let s = EtcdEpochStore::with_timeouts(
        &c.endpoints(),
        "/t-quorum",
        EtcdTimeouts {
            request: Duration::from_secs(3),
            call: Duration::from_secs(8),
        },
    )
    .unwrap();
    assert_eq!(s.compare_and_advance("vm1", 0).unwrap(), 1);
    c.kill(1);
    c.kill(2);
    let t = Instant::now();
    let r = s.compare_and_advance("vm1", 1);
    let took = t.elapsed();
    eprintln!("without quorum, after {took:?}: {r:?}");
    assert!(
        matches!(r, Err(EpochError::Io(_)) | Err(EpochError::Unknown { .. })),
        "{r:?}"
    );
    // Two calls (read, txn) and the resend, each within its budget.
    assert!(took < Duration::from_secs(60), "{took:?}");
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("127.0.0.1:"),
        "the error names endpoints: {msg}"
    );
    // Quorum back: the epoch is 1 or, if the doubtful advance applied, 2;
    // either way the store works again.
    c.restart(1);
    c.restart(2);
    c.wait_healthy(Duration::from_secs(90));
    let e = s.current("vm1").unwrap();
    assert!(e == 1 || e == 2, "{e}");
    assert_eq!(s.compare_and_advance("vm1", e).unwrap(), e + 1);
}

/// End to end: `serve --epoch-store etcd://...`, killed and restarted with
/// an empty state directory (another host, say), still refuses a stale
/// `NAME@EPOCH` export at the handshake and keeps the epoch.
#[test]
fn serve_with_etcd_store_survives_restart_with_empty_state_dir() {
    common::require("qemu-io");
    let c = Cluster::start(1);
    let url = format!("etcd://{}/t-e2e", c.endpoints()[0]);
    let mut srv = common::Server::start(&["vm1"], "8M", &["--epoch-store", &url]);
    common::run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x44 0 4k",
        &srv.uri("vm1@3"),
    ]));
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 3);
    assert_eq!(c.store("/t-e2e").current("vm1").unwrap(), 3);
    // Nothing of the epoch in the state directory.
    assert!(!srv.path("epochs/epochs.json").exists());
    let image = std::fs::read(srv.image("vm1")).unwrap();
    srv.stop();
    // A new server in a new, empty directory, on a copy of the image.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vm1.img"), &image).unwrap();
    let srv = common::Server::start_in(dir, &["vm1"], "8M", &["--epoch-store", &url]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4k", &srv.uri("vm1@2")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "stale epoch connected: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale"),
        "{out:?}"
    );
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 3);
    assert_eq!(c.store("/t-e2e").current("vm1").unwrap(), 3);
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..4096].iter().all(|&b| b == 0x44));
}

/// Host liveness: a renewed lease keeps the host's key; one no longer
/// renewed (a dead host) loses it after its TTL; a revoked one at once.
#[test]
fn host_lease_liveness() {
    use blkshim::epoch::etcd::gateway::Gateway;
    use blkshim::epoch::etcd::lease::{host_alive, HostLease};
    let c = Cluster::start(1);
    let gw = Arc::new(Gateway::new(
        &c.endpoints(),
        Duration::from_secs(5),
        Duration::from_secs(15),
    ));
    let a = HostLease::start(gw.clone(), "/t-lease", "hostA", 3).unwrap();
    let b = HostLease::start(gw.clone(), "/t-lease", "hostB", 3).unwrap();
    assert!(host_alive(&gw, "/t-lease", "hostA").unwrap());
    assert!(!host_alive(&gw, "/t-lease", "hostC").unwrap());
    // Three TTLs of renewals: still alive.
    std::thread::sleep(Duration::from_secs(9));
    assert!(a.alive() && host_alive(&gw, "/t-lease", "hostA").unwrap());
    // hostA dies (stops renewing): gone within TTL plus a margin.
    a.abandon();
    let t = Instant::now();
    while host_alive(&gw, "/t-lease", "hostA").unwrap() {
        assert!(t.elapsed() < Duration::from_secs(30), "lease never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "hostA's key went {:?} after its last renewal stopped",
        t.elapsed()
    );
    assert!(host_alive(&gw, "/t-lease", "hostB").unwrap());
    // hostB leaves cleanly: revoked at once.
    drop(b);
    assert!(!host_alive(&gw, "/t-lease", "hostB").unwrap());
}

/// `serve --fence ... --epoch-store etcd://` registers its host's
/// liveness: the key is there while it serves, revoked at once on a clean
/// stop, and gone within the TTL when the process is killed.
#[test]
fn serve_registers_host_liveness_in_etcd() {
    use blkshim::epoch::etcd::gateway::Gateway;
    use blkshim::epoch::etcd::lease::host_alive;
    let c = Cluster::start(1);
    let url = format!("etcd://{}/t-live", c.endpoints()[0]);
    let gw = Gateway::new(
        &c.endpoints(),
        Duration::from_secs(5),
        Duration::from_secs(15),
    );
    let args = |host: &'static str| {
        vec![
            "--epoch-store".to_string(),
            url.clone(),
            "--fence".into(),
            "none".into(),
            "--host-id".into(),
            host.into(),
            "--host-lease-ttl".into(),
            "2".into(),
        ]
    };
    let a_args = args("hostA");
    let a_refs: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = common::Server::start(&["vm1"], "8M", &a_refs);
    assert!(host_alive(&gw, "/t-live", "hostA").unwrap(), "{}", a.log());
    assert!(a.log().contains("registered in etcd"), "{}", a.log());
    // Renewals keep it through several TTLs.
    std::thread::sleep(Duration::from_secs(5));
    assert!(host_alive(&gw, "/t-live", "hostA").unwrap(), "{}", a.log());
    a.stop();
    assert!(
        !host_alive(&gw, "/t-live", "hostA").unwrap(),
        "a clean stop revokes the lease"
    );
    let b_args = args("hostB");
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = common::Server::start(&["vm1"], "8M", &b_refs);
    assert!(host_alive(&gw, "/t-live", "hostB").unwrap(), "{}", b.log());
    b.kill();
    let t = Instant::now();
    while host_alive(&gw, "/t-live", "hostB").unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the killed host's lease never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "a killed server's liveness key went after {:?}",
        t.elapsed()
    );
}

// The checker itself.

fn op(client: usize, call: Call, ret: Ret, invoked: u64, returned: Option<u64>) -> Op {
    Op {
        client,
        call,
        ret,
        invoked,
        returned,
    }
}

#[test]
fn checker_accepts_a_linearizable_history() {
    let adv = |e| Call::Advance { expected: e };
    // Two concurrent advances from 0: one wins, one sees 1.
    let h = vec![
        op(0, adv(0), Ret::Advanced(1), 0, Some(10)),
        op(1, adv(0), Ret::Conflict(1), 1, Some(11)),
        op(2, Call::Read, Ret::Value(1), 12, Some(13)),
        // An unknown advance from 1 that did apply, seen by a later read.
        op(1, adv(1), Ret::Unknown, 14, None),
        op(0, Call::Read, Ret::Value(2), 20, Some(21)),
    ];
    assert!(check(&h, 0));
    assert!(extra_checks(&h).is_empty());
    // ... and one that did not.
    let mut h2 = h.clone();
    h2[4].ret = Ret::Value(1);
    assert!(check(&h2, 0));
}

#[test]
fn checker_rejects_non_linearizable_histories() {
    let adv = |e| Call::Advance { expected: e };
    // Both advances from 0 reported success: a lost fence.
    let h = vec![
        op(0, adv(0), Ret::Advanced(1), 0, Some(10)),
        op(1, adv(0), Ret::Advanced(1), 1, Some(11)),
    ];
    assert!(!check(&h, 0));
    assert!(!extra_checks(&h).is_empty());
    // A stale read after a completed advance.
    let h = vec![
        op(0, adv(0), Ret::Advanced(1), 0, Some(10)),
        op(1, Call::Read, Ret::Value(0), 11, Some(12)),
    ];
    assert!(!check(&h, 0));
    // A read that goes back in time.
    let h = vec![
        op(0, adv(0), Ret::Advanced(1), 0, Some(10)),
        op(0, adv(1), Ret::Unknown, 11, None),
        op(1, Call::Read, Ret::Value(2), 20, Some(21)),
        op(2, Call::Read, Ret::Value(1), 22, Some(23)),
    ];
    assert!(!check(&h, 0));
    // A conflict that reports a value the register never had then.
    let h = vec![
        op(0, adv(0), Ret::Advanced(1), 0, Some(10)),
        op(1, adv(0), Ret::Conflict(2), 11, Some(12)),
    ];
    assert!(!check(&h, 0));
    // Real-time order: epoch 2 returned before epoch 1 was asked for.
    let h = vec![
        op(0, adv(1), Ret::Advanced(2), 0, Some(10)),
        op(1, adv(0), Ret::Advanced(1), 11, Some(12)),
    ];
    assert!(!check(&h, 0));
    assert!(!extra_checks(&h).is_empty());
}
