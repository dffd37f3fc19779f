use super::gateway::*;
use super::parse_epoch;
use serde_json::json;

#[test]
fn failed_txn_has_no_succeeded() {
    // What etcd 3.4.23 returns for a failed compare with a range in `failure`.
    let body = br#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"7","raft_term":"2"},"responses":[{"response_range":{"header":{"revision":"7"},"kvs":[{"key":"L2Jsa3NoaW0vZXBvY2gvdm0x","create_revision":"2","mod_revision":"7","version":"3","value":"Mw=="}],"count":"1"}},{"response_range":{"header":{"revision":"7"}}}]}"#;
    let r = parse_txn_response(body).unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 7);
    assert_eq!(r.ranges.len(), 2);
    assert_eq!(r.ranges[0][0].key, b"/blkshim/epoch/vm1");
    assert_eq!(r.ranges[0][0].value, b"3");
    assert_eq!(r.ranges[0][0].mod_revision, 7);
    assert_eq!(r.ranges[0][0].create_revision, 2);
    // The absent claim: no kvs, no count.
    assert!(r.ranges[1].is_empty());
}

#[test]
fn succeeded_txn_with_puts() {
    let body = br#"{"header":{"revision":"8"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"8"}}},{"response_put":{"header":{"revision":"8"}}}]}"#;
    let r = parse_txn_response(body).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 8);
    assert!(r.ranges.is_empty());
}

#[test]
fn missing_fields_are_defaults() {
    let r = parse_txn_response(b"{}").unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 0);
    // A kv whose value is empty and revision 0 omits both.
    let kvs = parse_range_response(br#"{"kvs":[{"key":"YQ=="}]}"#).unwrap();
    assert_eq!(kvs[0].value, b"");
    assert_eq!(kvs[0].mod_revision, 0);
    assert!(parse_range_response(br#"{"header":{"revision":"3"}}"#)
        .unwrap()
        .is_empty());
}

#[test]
fn int64_as_strings_and_numbers() {
    let v = json!({"a": "9223372036854775807", "b": 5, "c": "x", "d": "-1", "e": 1.5, "f": true});
    assert_eq!(int64_field(&v, "a").unwrap(), i64::MAX);
    assert_eq!(int64_field(&v, "b").unwrap(), 5);
    assert_eq!(int64_field(&v, "d").unwrap(), -1);
    assert_eq!(int64_field(&v, "missing").unwrap(), 0);
    assert!(int64_field(&v, "c").is_err());
    assert!(int64_field(&v, "e").is_err());
    assert!(int64_field(&v, "f").is_err());
}

#[test]
fn malformed_responses_are_errors_not_panics() {
    for body in [
        &b""[..],
        b"[]",
        b"null",
        b"{\"succeeded\":\"true\"}",
        b"{\"responses\":{}}",
        b"{\"responses\":[{\"response_range\":{\"kvs\":[{\"value\":\"!!\"}]}}]}",
        b"{\"responses\":[{\"response_range\":{\"kvs\":[1]}}]}",
        b"{\"responses\":[{\"response_range\":{\"kvs\":[{\"mod_revision\":\"1e3\"}]}}]}",
    ] {
        assert!(
            parse_txn_response(body).is_err(),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn txn_encoding() {
    let v = encode_txn(
        &[
            Compare::ModRevision(b"/k".to_vec(), 12),
            Compare::CreateRevision(b"/k".to_vec(), 0),
        ],
        &[Op::Put(b"/k".to_vec(), b"10".to_vec())],
        &[Op::Range(b"/k".to_vec())],
    );
    assert_eq!(
        v,
        json!({
            "compare": [
                {"target": "MOD", "result": "EQUAL", "key": "L2s=", "mod_revision": "12"},
                {"target": "CREATE", "result": "EQUAL", "key": "L2s=", "create_revision": "0"}
            ],
            "success": [{"request_put": {"key": "L2s=", "value": "MTA="}}],
            "failure": [{"request_range": {"key": "L2s="}}]
        })
    );
}

#[test]
fn epochs_are_decimal_and_never_compared_as_bytes() {
    assert_eq!(parse_epoch(b"10"), Some(10));
    assert_eq!(parse_epoch(b"0"), Some(0));
    assert_eq!(parse_epoch(b"18446744073709551615"), Some(u64::MAX));
    for bad in [
        &b""[..],
        b"-1",
        b"1 ",
        b"0x10",
        b"18446744073709551616",
        b"\xff",
    ] {
        assert_eq!(parse_epoch(bad), None);
    }
    // Why the txn compares mod_revision, not the value:
    assert!(b"10"[..] < b"9"[..]);
}

#[test]
fn unreachable_endpoints_fail_in_time_naming_them() {
    // Port 1 on loopback: refused at once, so never applied.
    let gw = Gateway::new(
        &["127.0.0.1:1".to_string(), "http://127.0.0.1:1/".to_string()],
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(1),
    );
    let t = std::time::Instant::now();
    let e = gw.get(b"/k").unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(!e.maybe_applied);
    assert!(e.to_string().contains("http://127.0.0.1:1"), "{e}");
}

// The store's handling of doubtful outcomes, against a fake gateway on
// loopback that answers (or does not) as each scenario needs.

use super::{EtcdEpochStore, EtcdTimeouts};
use crate::epoch::{EpochError, EpochStore};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fake answers to one request: a JSON body (200), an HTTP error,
/// or nothing (the connection hangs past the client's timeout).
enum Answer {
    Json(Value),
    Status(u16, &'static str),
    Hang,
}

/// The requests a fake gateway saw: path and body.
type RequestLog = Arc<Mutex<Vec<(String, Value)>>>;

/// A fake gateway; `f(path, request, n)` answers the `n`-th request.
fn fake_gateway(
    f: impl Fn(&str, &Value, usize) -> Answer + Send + Sync + 'static,
) -> (String, RequestLog) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let f = Arc::new(f);
    let log2 = log.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let f = f.clone();
            let log = log2.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let req: Value = serde_json::from_slice(&body).unwrap();
                let n = {
                    let mut g = log.lock().unwrap();
                    g.push((path.clone(), req.clone()));
                    g.len() - 1
                };
                let (status, text) = match f(&path, &req, n) {
                    Answer::Json(v) => (200, v.to_string()),
                    Answer::Status(s, m) => (s, format!("{{\"error\":\"{m}\",\"code\":14}}")),
                    Answer::Hang => {
                        std::thread::sleep(Duration::from_secs(3));
                        return;
                    }
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    (addr, log)
}

fn fast_store(addr: &str) -> EtcdEpochStore {
    EtcdEpochStore::with_timeouts(
        &[addr.to_string()],
        "/p",
        EtcdTimeouts {
            request: Duration::from_millis(300),
            call: Duration::from_millis(800),
        },
    )
    .unwrap()
}

/// A range answer: the epoch key at `epoch`, mod_revision 5.
fn range_at(epoch: u64) -> Value {
    serde_json::json!({"header": {"revision": "5"}, "kvs": [{
        "key": b64(b"/p/epoch/vm1"), "value": b64(epoch.to_string().as_bytes()),
        "create_revision": "2", "mod_revision": "5", "version": "3"}], "count": "1"})
}

/// The claim value a txn request would put.
fn claim_of(req: &Value) -> Vec<u8> {
    use base64::Engine as _;
    let v = req["success"][1]["request_put"]["value"].as_str().unwrap();
    base64::engine::general_purpose::STANDARD.decode(v).unwrap()
}

/// A failed txn's answer: the epoch key at `epoch`, the claim `claim`.
fn failed_txn(epoch: u64, claim: &[u8]) -> Value {
    serde_json::json!({"header": {"revision": "6"}, "responses": [
        {"response_range": range_at(epoch)},
        {"response_range": {"kvs": [{"key": b64(b"/p/claim/vm1/x"), "value": b64(claim),
            "mod_revision": "6"}]}}]})
}

#[test]
fn txn_ack_lost_but_applied_is_a_success() {
    let applied = Arc::new(Mutex::new(None));
    let a2 = applied.clone();
    let (addr, log) = fake_gateway(move |path, req, _| {
        if path.ends_with("/range") {
            return Answer::Json(range_at(3));
        }
        let mut g = a2.lock().unwrap();
        match &*g {
            // The first send applies, and its answer never comes.
            None => {
                *g = Some(claim_of(req));
                Answer::Hang
            }
            Some(c) => Answer::Json(failed_txn(4, c)),
        }
    });
    let s = fast_store(&addr);
    assert_eq!(s.compare_and_advance("vm1", 3).unwrap(), 4);
    let (doubtful, won_earlier) = s.doubtful_stats();
    assert!(
        doubtful >= 1 && won_earlier == 1,
        "{doubtful} {won_earlier}"
    );
    let log = log.lock().unwrap();
    let txn = &log[1].1;
    assert_eq!(txn["compare"][0]["target"], "MOD");
    assert_eq!(txn["compare"][0]["mod_revision"], "5");
    assert!(txn.to_string().contains(&b64(b"4")), "{txn}");
    // Every send of the txn was the same txn (same compare, same claim).
    for (p, r) in log.iter().skip(1) {
        assert!(p.ends_with("/v3/kv/txn"));
        assert_eq!(r, txn);
    }
}

#[test]
fn txn_never_answered_is_unknown_not_success() {
    let (addr, _) = fake_gateway(|path, _, _| {
        if path.ends_with("/range") {
            Answer::Json(range_at(3))
        } else {
            Answer::Hang
        }
    });
    let s = fast_store(&addr);
    match s.compare_and_advance("vm1", 3) {
        Err(e @ EpochError::Unknown { .. }) => {
            assert!(e.to_string().contains(&addr), "{e}");
            assert!(e.to_string().contains("outcome unknown"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn txn_doubtful_then_lost_to_another_is_a_conflict() {
    let (addr, _) = fake_gateway(|path, _, n| {
        if path.ends_with("/range") {
            Answer::Json(range_at(3))
        } else if n == 1 {
            Answer::Status(503, "etcdserver: request timed out")
        } else {
            Answer::Json(failed_txn(4, b"someone-else"))
        }
    });
    let s = fast_store(&addr);
    match s.compare_and_advance("vm1", 3) {
        Err(EpochError::Conflict {
            expected: 3,
            current: 4,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn create_if_absent_compares_create_revision_zero() {
    let (addr, log) = fake_gateway(|path, _, _| {
        if path.ends_with("/range") {
            Answer::Json(serde_json::json!({"header": {"revision": "1"}}))
        } else {
            Answer::Json(serde_json::json!({"header": {"revision": "2"}, "succeeded": true}))
        }
    });
    let s = fast_store(&addr);
    assert_eq!(s.current("vm1").unwrap(), 0);
    assert_eq!(s.compare_and_advance("vm1", 0).unwrap(), 1);
    let log = log.lock().unwrap();
    let txn = &log[2].1;
    assert_eq!(txn["compare"][0]["target"], "CREATE");
    assert_eq!(txn["compare"][0]["create_revision"], "0");
}

#[test]
fn a_corrupt_epoch_value_is_an_error() {
    let (addr, _) = fake_gateway(|_, _, _| {
        Answer::Json(
            serde_json::json!({"kvs": [{"key": b64(b"/p/epoch/vm1"), "value": b64(b"9x")}]}),
        )
    });
    let s = fast_store(&addr);
    assert!(matches!(s.current("vm1"), Err(EpochError::Io(_))));
}

#[test]
fn keepalive_of_an_expired_lease_has_no_ttl() {
    use super::lease::keepalive_ttl;
    let live =
        serde_json::json!({"result": {"header": {"revision": "3"}, "ID": "7587", "TTL": "5"}});
    assert_eq!(keepalive_ttl(&live).unwrap(), 5);
    // Verified on 3.4.23: an expired lease's keepalive omits TTL.
    let expired = serde_json::json!({"result": {"header": {"revision": "3"}, "ID": "7587"}});
    assert_eq!(keepalive_ttl(&expired).unwrap(), 0);
}

#[test]
fn mutated_responses_never_panic() {
    // A cheap in-tree stand-in for the etcd_response fuzz target: byte
    // flips, insertions and truncations of real responses.
    let seeds: [&[u8]; 3] = [
        br#"{"header":{"revision":"7"},"responses":[{"response_range":{"kvs":[{"key":"L2s=","create_revision":"2","mod_revision":"7","version":"3","value":"Mw=="}],"count":"1"}},{"response_range":{}}]}"#,
        br#"{"header":{"revision":"8"},"succeeded":true,"responses":[{"response_put":{}}]}"#,
        br#"{"kvs":[{"key":"YQ==","value":"MTA=","mod_revision":"12"}]}"#,
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let mut b = seeds[i % seeds.len()].to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % b.len().max(1);
            match next() % 4 {
                0 => b[at] = next() as u8,
                1 => b.insert(at, b"\"{}[]:,0-9e"[(next() % 11) as usize]),
                2 => b.truncate(at),
                _ => {
                    if at < b.len() {
                        b.remove(at);
                    }
                }
            }
            if b.is_empty() {
                break;
            }
        }
        let _ = parse_txn_response(&b);
        let _ = parse_range_response(&b);
        let _ = parse_epoch(&b);
    }
}
