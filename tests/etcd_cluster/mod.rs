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
    pub client: u16,
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

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        require_etcd();
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let token = format!("blkshim-test-{}", std::process::id());
        let mut members = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let data = dir.path().join(format!("m{i}"));
            let args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls=http://127.0.0.1:{c}"),
                format!("--advertise-client-urls=http://127.0.0.1:{c}"),
                format!("--listen-peer-urls=http://127.0.0.1:{p}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"),
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
                client: *c,
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
            .map(|m| format!("127.0.0.1:{}", m.client))
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
                    .get(&format!("http://127.0.0.1:{}/health", m.client))
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
                    "http://127.0.0.1:{}/v3/maintenance/status",
                    m.client
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
        let child = Command::new(ETCD)
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
