//! A tiny synchronous client of etcd's JSON gRPC gateway (`POST /v3/...`),
//! with endpoint failover and a timeout on every call, and the decoding of
//! its responses.
//!
//! The traps of the gateway's JSON (verified on etcd 3.4.23): keys and
//! values are base64; int64 fields (revisions, lease ids, TTLs) are JSON
//! strings; proto3 leaves out fields at their default, so a failed txn has
//! no `succeeded`, an absent key's range no `kvs` and no `count`, and a
//! revision 0 is simply missing. Every field is therefore optional here,
//! and a missing one reads as its default.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One key-value as the gateway returns it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
}

/// A decoded txn response: did the comparison hold, and the kvs of each
/// range in the executed branch, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The cluster revision after the txn (the new mod_revision of a put).
    pub revision: i64,
    pub ranges: Vec<Vec<KeyValue>>,
}

/// Why a gateway response could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed etcd response: {}", self.0)
    }
}

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// An int64 field: a JSON string of decimal digits (the gateway's form), or
/// a plain number (tolerated); missing or null is 0.
pub fn int64_field(obj: &Value, name: &str) -> Result<i64, DecodeError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s
            .parse::<i64>()
            .map_err(|_| bad(format!("{name} is {s:?}, not an int64"))),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| bad(format!("{name} is {n}, not an int64"))),
        Some(other) => Err(bad(format!("{name} is {other}, not an int64"))),
    }
}

/// A bool field; missing or null is false (proto3's default).
pub fn bool_field(obj: &Value, name: &str) -> Result<bool, DecodeError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(format!("{name} is {other}, not a bool"))),
    }
}

/// A bytes field (base64); missing or null is empty.
pub fn bytes_field(obj: &Value, name: &str) -> Result<Vec<u8>, DecodeError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => B64
            .decode(s)
            .map_err(|e| bad(format!("{name} is not base64: {e}"))),
        Some(other) => Err(bad(format!("{name} is {other}, not base64"))),
    }
}

fn array_field<'a>(obj: &'a Value, name: &str) -> Result<&'a [Value], DecodeError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(bad(format!("{name} is {other}, not an array"))),
    }
}

fn decode_kv(v: &Value) -> Result<KeyValue, DecodeError> {
    if !v.is_object() {
        return Err(bad(format!("kv {v} is not an object")));
    }
    Ok(KeyValue {
        key: bytes_field(v, "key")?,
        value: bytes_field(v, "value")?,
        create_revision: int64_field(v, "create_revision")?,
        mod_revision: int64_field(v, "mod_revision")?,
        version: int64_field(v, "version")?,
    })
}

/// The kvs of a range response (none when the key is absent: no `kvs`).
pub fn decode_range(v: &Value) -> Result<Vec<KeyValue>, DecodeError> {
    if !v.is_object() {
        return Err(bad("range response is not an object"));
    }
    array_field(v, "kvs")?.iter().map(decode_kv).collect()
}

fn header_revision(v: &Value) -> Result<i64, DecodeError> {
    match v.get("header") {
        None | Some(Value::Null) => Ok(0),
        Some(h) => int64_field(h, "revision"),
    }
}

/// A txn response. `succeeded` is missing when the comparison failed.
pub fn decode_txn(v: &Value) -> Result<TxnResponse, DecodeError> {
    if !v.is_object() {
        return Err(bad("txn response is not an object"));
    }
    let mut ranges = Vec::new();
    for r in array_field(v, "responses")? {
        // A put's response has only a header; a range's is under response_range.
        if let Some(rr) = r.get("response_range") {
            ranges.push(decode_range(rr)?);
        }
    }
    Ok(TxnResponse {
        succeeded: bool_field(v, "succeeded")?,
        revision: header_revision(v)?,
        ranges,
    })
}

/// Parses a response body and decodes it as a txn response (the fuzz
/// target's entry).
pub fn parse_txn_response(body: &[u8]) -> Result<TxnResponse, DecodeError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    decode_txn(&v)
}

/// Parses a response body and decodes it as a range response.
pub fn parse_range_response(body: &[u8]) -> Result<Vec<KeyValue>, DecodeError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    decode_range(&v)
}

/// base64 of raw bytes, as the gateway wants keys and values.
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A comparison of a txn.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key's mod_revision equals this (the key exists, unchanged).
    ModRevision(Vec<u8>, i64),
    /// The key's create_revision equals this (0: the key is absent).
    CreateRevision(Vec<u8>, i64),
}

/// An operation of a txn branch.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Range(Vec<u8>),
}

fn encode_compare(c: &Compare) -> Value {
    // int64 as strings, like the gateway's own output.
    match c {
        Compare::ModRevision(k, r) => json!({
            "target": "MOD", "result": "EQUAL", "key": b64(k), "mod_revision": r.to_string()
        }),
        Compare::CreateRevision(k, r) => json!({
            "target": "CREATE", "result": "EQUAL", "key": b64(k), "create_revision": r.to_string()
        }),
    }
}

fn encode_op(o: &Op) -> Value {
    match o {
        Op::Put(k, v) => json!({"request_put": {"key": b64(k), "value": b64(v)}}),
        Op::Range(k) => json!({"request_range": {"key": b64(k)}}),
    }
}

/// The JSON body of a txn.
pub fn encode_txn(compare: &[Compare], success: &[Op], failure: &[Op]) -> Value {
    json!({
        "compare": compare.iter().map(encode_compare).collect::<Vec<_>>(),
        "success": success.iter().map(encode_op).collect::<Vec<_>>(),
        "failure": failure.iter().map(encode_op).collect::<Vec<_>>(),
    })
}

/// Why a call failed, and whether the request may have taken effect.
#[derive(Debug, Clone)]
pub struct CallError {
    /// Per endpoint tried: `http://host:port: why`.
    pub attempts: Vec<String>,
    /// Some attempt may have reached etcd and been applied (a timeout or a
    /// broken connection after the request left, or an error etcd reports
    /// for a proposal it may still commit). Never false when in doubt.
    pub maybe_applied: bool,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.attempts.join("; "))
    }
}

/// What one attempt on one endpoint gave.
enum Attempt {
    Ok(Value),
    /// Definitely not applied (the connection was refused, or etcd refused
    /// the request before proposing it): try the next endpoint.
    NotApplied(String),
    /// Maybe applied: try the next endpoint, but remember.
    Unknown(String),
}

/// The gateway client: several endpoints (`host:port`), the last one that
/// answered tried first.
pub struct Gateway {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    preferred: AtomicUsize,
    /// The whole budget of one call across endpoints and retries.
    call_timeout: Duration,
    /// Attempts whose outcome was doubtful (see [`Gateway::doubtful_attempts`]).
    doubtful: AtomicU64,
}

impl Gateway {
    /// `endpoints`: `host:port` (or `http://host:port`). `request_timeout`
    /// bounds each HTTP request; `call_timeout` a call across endpoints.
    pub fn new(endpoints: &[String], request_timeout: Duration, call_timeout: Duration) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(request_timeout.min(Duration::from_secs(2)))
            .timeout(request_timeout)
            .build();
        Gateway {
            endpoints: endpoints
                .iter()
                .map(|e| {
                    if e.starts_with("http://") {
                        e.trim_end_matches('/').to_string()
                    } else {
                        format!("http://{}", e.trim_end_matches('/'))
                    }
                })
                .collect(),
            agent,
            preferred: AtomicUsize::new(0),
            call_timeout,
            doubtful: AtomicU64::new(0),
        }
    }

    /// How many attempts so far had a doubtful outcome (timed out after the
    /// request left, cut off, or an etcd error): for tests and statistics.
    pub fn doubtful_attempts(&self) -> u64 {
        self.doubtful.load(Ordering::Relaxed)
    }

    /// The endpoints, as URLs.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn attempt(&self, endpoint: &str, path: &str, body: &str) -> Attempt {
        let url = format!("{endpoint}{path}");
        match self
            .agent
            .post(&url)
            .set("Content-Type", "application/json")
            .send_string(body)
        {
            Ok(resp) => match resp.into_string() {
                Ok(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(v) => Attempt::Ok(v),
                    Err(e) => Attempt::Unknown(format!("{endpoint}: unreadable response: {e}")),
                },
                Err(e) => Attempt::Unknown(format!("{endpoint}: response cut off: {e}")),
            },
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| {
                        v.get("error")
                            .or_else(|| v.get("message"))
                            .and_then(|m| m.as_str().map(str::to_string))
                    })
                    .unwrap_or(text);
                // etcd's errors for a proposal that may still commit
                // ("request timed out", "leader changed", ...) are doubtful;
                // only a refusal before proposing is definite. Treat every
                // server error as doubtful: a read-back resolves it.
                Attempt::Unknown(format!("{endpoint}: HTTP {code}: {}", msg.trim()))
            }
            Err(ureq::Error::Transport(t)) => match t.kind() {
                ureq::ErrorKind::ConnectionFailed
                | ureq::ErrorKind::Dns
                | ureq::ErrorKind::InvalidUrl
                | ureq::ErrorKind::UnknownScheme => {
                    // ureq's message names the URL.
                    Attempt::NotApplied(format!("{t} (not reached)"))
                }
                _ => Attempt::Unknown(format!("{t} (outcome unknown)")),
            },
        }
    }

    /// POST `body` to `path` (e.g. `/v3/kv/txn`), on the preferred endpoint
    /// and then the others, until one answers or the call's budget is spent.
    pub fn call(&self, path: &str, body: &Value) -> Result<Value, CallError> {
        let text = body.to_string();
        let deadline = Instant::now() + self.call_timeout;
        let n = self.endpoints.len();
        // The last failure per endpoint, and how many attempts in all.
        let mut last: Vec<Option<String>> = vec![None; n];
        let mut tries = 0u32;
        let mut maybe_applied = false;
        let mut round = 0u32;
        let started = Instant::now();
        let give_up = |last: Vec<Option<String>>, tries: u32, maybe_applied: bool| {
            let mut attempts: Vec<String> = last.into_iter().flatten().collect();
            attempts.push(format!(
                "{tries} attempts in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            CallError {
                attempts,
                maybe_applied,
            }
        };
        loop {
            let start = self.preferred.load(Ordering::Relaxed);
            for i in 0..n {
                let idx = (start + i) % n;
                tries += 1;
                match self.attempt(&self.endpoints[idx], path, &text) {
                    Attempt::Ok(v) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Attempt::NotApplied(why) => last[idx] = Some(why),
                    Attempt::Unknown(why) => {
                        self.doubtful.fetch_add(1, Ordering::Relaxed);
                        maybe_applied = true;
                        last[idx] = Some(why);
                    }
                }
                if Instant::now() >= deadline {
                    return Err(give_up(last, tries, maybe_applied));
                }
            }
            // Every endpoint failed: back off a little (an election takes
            // a second or so), then go round again within the budget.
            round += 1;
            let pause = Duration::from_millis(100 * u64::from(round.min(10)));
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(give_up(last, tries, maybe_applied));
            }
            std::thread::sleep(pause.min(left));
        }
    }

    /// A linearizable read of one key.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, CallError> {
        let v = self.call("/v3/kv/range", &json!({"key": b64(key)}))?;
        decode_range(&v)
            .map(|kvs| kvs.into_iter().next())
            .map_err(|e| CallError {
                attempts: vec![e.to_string()],
                maybe_applied: false,
            })
    }

    /// A txn.
    pub fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, CallError> {
        let v = self.call("/v3/kv/txn", &encode_txn(compare, success, failure))?;
        decode_txn(&v).map_err(|e| CallError {
            attempts: vec![e.to_string()],
            maybe_applied: true,
        })
    }
}
