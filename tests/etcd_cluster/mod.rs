//! A throwaway etcd cluster for tests and benches: 1 or 3 members of
//! `/usr/bin/etcd` (Debian's etcd-server) on free loopback ports in a temp
//! dir, killed on drop. Never the packaged etcd.service.
#![allow(dead_code)]

use blkshim::epoch::EtcdEpochStore;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ETCD: &str = "/usr/bin/etcd";

/// Fail loudly when etcd is missing.
pub fn require_etcd() {
    assert!(
        std::path::Path::new(ETCD).is_file(),
        "required tool {ETCD} is not installed (apt-get install etcd-server, then stop etcd.service)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct Member {
    pub name: String,
    /// The address its client and peer URLs listen on.
    pub ip: String,
    pub client: u16,
    /// The network namespace it runs in (`ip netns exec`), if its own.
    netns: Option<String>,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

/// 1 or 3 etcd members on loopback, killed on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    pub members: Vec<Member>,
    /// One cluster at a time per process: a 2-core machine running several
    /// would see spurious elections and slow tests.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The one-cluster-at-a-time turn of this process, for a test whose
/// cluster runs in a child process.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        let places = (0..n)
            .map(|_| ("127.0.0.1".to_string(), free_port(), free_port(), None))
            .collect();
        Cluster::start_at(places)
    }

    /// `n` members, each in its own network namespace `PREFIX-mI` at
    /// 10.77.0.(10+I) behind a bridge whose side here is 10.77.0.1: a
    /// member can be cut off with nftables in its namespace. Run only in a
    /// private network and mount namespace of a root process (`unshare
    /// --net --mount`): the namespaces and the bridge go with it.
    pub fn start_netns(n: usize, prefix: &str) -> Cluster {
        let sh = |cmd: &str| {
            let out = Command::new("sh")
                .args(["-ec", cmd])
                .output()
                .unwrap_or_else(|e| panic!("sh -c {cmd}: {e}"));
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh("ip link set lo up; ip link add br0 type bridge; ip addr add 10.77.0.1/24 dev br0; ip link set br0 up");
        let mut places = Vec::new();
        for i in 0..n {
            let ns = format!("{prefix}-m{i}");
            let ip = format!("10.77.0.{}", 10 + i);
            sh(&format!(
                "ip netns add {ns}; ip link add v{i} type veth peer name v{i}p; \
                 ip link set v{i}p netns {ns}; ip link set v{i} master br0 up; \
                 ip -n {ns} link set lo up; ip -n {ns} addr add {ip}/24 dev v{i}p; \
                 ip -n {ns} link set v{i}p up"
            ));
            places.push((ip, 2379, 2380, Some(ns)));
        }
        Cluster::start_at(places)
    }

    /// Cuts member `i` off from every other member (`true`), or heals it:
    /// nftables in its namespace drops what it sends to and receives from
    /// their addresses; clients (10.77.0.1) still reach it.
    pub fn cut_off(&self, i: usize, cut: bool) {
        let m = &self.members[i];
        let ns = m.netns.as_deref().expect("a member in its own namespace");
        let peers: Vec<&str> = self
            .members
            .iter()
            .filter(|o| o.name != m.name)
            .map(|o| o.ip.as_str())
            .collect();
        let set = peers.join(", ");
        let script = if cut {
            format!(
                "table inet cutoff {{\n chain input {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}\n chain output {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}\n}}\n"
            )
        } else {
            "delete table inet cutoff\n".to_string()
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("nft script");
        assert!(child.wait().expect("nft").success(), "nft: {script}");
    }

    fn start_at(places: Vec<(String, u16, u16, Option<String>)>) -> Cluster {
        require_etcd();
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().expect("temp dir");
        let initial: Vec<String> = places
            .iter()
            .enumerate()
            .map(|(i, (ip, _, p, _))| format!("m{i}=http://{ip}:{p}"))
            .collect();
        let token = format!("blkshim-test-{}", std::process::id());
        let mut members = Vec::new();
        for (i, (ip, c, p, netns)) in places.into_iter().enumerate() {
            let data = dir.path().join(format!("m{i}"));
            let args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls=http://{ip}:{c}"),
                format!("--advertise-client-urls=http://{ip}:{c}"),
                format!("--listen-peer-urls=http://{ip}:{p}"),
                format!("--initial-advertise-peer-urls=http://{ip}:{p}"),
                format!("--initial-cluster={}", initial.join(",")),
                format!("--initial-cluster-token={token}"),
                "--initial-cluster-state=new".to_string(),
                // A loaded 2-core machine: slower heartbeats, fewer
                // spurious elections.
                "--heartbeat-interval=200".to_string(),
                "--election-timeout=2000".to_string(),
            ];
            let mut m = Member {
                name: format!("m{i}"),
                ip,
                client: c,
                netns,
                args,
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            };
            m.spawn();
            members.push(m);
        }
        let c = Cluster {
            dir,
            members,
            _one_at_a_time: guard,
        };
        c.wait_healthy(Duration::from_secs(90));
        c
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}:{}", m.ip, m.client))
            .collect()
    }

    pub fn store(&self, prefix: &str) -> EtcdEpochStore {
        EtcdEpochStore::new(&self.endpoints(), prefix).expect("store")
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            s += &format!("--- {} ({}):\n", m.name, m.log.display());
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    /// Every running member answers /health with a leader.
    pub fn wait_healthy(&self, limit: Duration) {
        let start = Instant::now();
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(3))
            .build();
        loop {
            let ok = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                agent
                    .get(&format!("http://{}:{}/health", m.ip, m.client))
                    .call()
                    .ok()
                    .and_then(|r| r.into_string().ok())
                    .is_some_and(|b| b.contains("\"true\""))
            });
            if ok {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "etcd cluster not healthy after {limit:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The index of the member that is the leader, asked via
    /// /v3/maintenance/status.
    pub fn leader(&self) -> Option<usize> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(3))
            .build();
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let Ok(r) = agent
                .post(&format!(
                    "http://{}:{}/v3/maintenance/status",
                    m.ip, m.client
                ))
                .send_string("{}")
            else {
                continue;
            };
            let Some(v) = r
                .into_string()
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            else {
                continue;
            };
            let me = v["header"]["member_id"].as_str().map(str::to_string);
            let leader = v["leader"].as_str().map(str::to_string);
            if me.is_some() && me == leader {
                return Some(i);
            }
        }
        None
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT a member: frozen, it neither answers
    /// nor sends, like a member cut off from the network, and requests
    /// already sent to it wait in its socket buffers to be served late.
    pub fn freeze(&self, i: usize, frozen: bool) {
        if let Some(c) = &self.members[i].child {
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: signalling our own child by pid.
            let rc = unsafe { libc::kill(c.id() as i32, sig) };
            assert_eq!(rc, 0, "signalling {}", self.members[i].name);
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.members[i].spawn();
    }
}

impl Member {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs etcd: the child's pid is etcd's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD]);
                c
            }
            None => Command::new(ETCD),
        };
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD}: {e}"));
        self.child = Some(child);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = &self.dir;
    }
}
