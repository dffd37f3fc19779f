//! NBD over TLS with real peers (nbdinfo, nbdcopy, nbdsh, qemu-io,
//! qemu-img) and the authorization of who may open which disk and who may
//! advance its epoch. Certificates are made per test with the openssl
//! CLI in a temp dir: a CA, a server certificate for 127.0.0.1/localhost,
//! clients host-a, host-b and host-c from that CA, and a host-a from
//! another CA. Every refusal sits beside the same client succeeding where
//! it should, so a refusal is the TLS or the rules' doing and not a broken
//! client.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The certificate directories, as libnbd's `tls-certificates=DIR` and
/// qemu's `tls-creds-x509,dir=DIR` read them.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        require("openssl");
        let dir = tempfile::tempdir().expect("tempdir");
        let script = r#"
set -e
mk_ca() {
  mkdir -p "$1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$1/ca-key.pem" -out "$1/ca-cert.pem" -days 2 -subj "/O=blkshim-test/CN=$2" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
mk_cert() { # CA-DIR OUT-DIR KIND SUBJECT EXTENSIONS
  mkdir -p "$2"
  cp ca/ca-cert.pem "$2/"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$2/$3-key.pem" -out "$2/$3.csr" -subj "$4"
  printf "$5" > "$2/$3.ext"
  openssl x509 -req -in "$2/$3.csr" -CA "$1/ca-cert.pem" -CAkey "$1/ca-key.pem" \
    -CAcreateserial -out "$2/$3-cert.pem" -days 2 -extfile "$2/$3.ext"
}
mk_ca ca "blkshim test CA"
mk_ca otherca "another CA"
mk_cert ca server server "/O=blkshim-test/CN=localhost" \
  "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
client_ext="extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
for h in a b c; do mk_cert ca "host-$h" client "/O=blkshim-test/CN=host-$h" "$client_ext"; done
mk_cert otherca other client "/O=blkshim-test/CN=host-a" "$client_ext"
# The client trusts the server's CA and (qemu checks its own certificate)
# its own; only the server must refuse it.
cat otherca/ca-cert.pem >> other/ca-cert.pem
mkdir -p nocert && cp ca/ca-cert.pem nocert/
"#;
        run_ok(
            Command::new("bash")
                .args(["-c", script])
                .current_dir(dir.path()),
        );
        Pki { dir }
    }

    fn path(&self, who: &str) -> PathBuf {
        self.dir.path().join(who)
    }

    fn server(&self) -> String {
        self.path("server").display().to_string()
    }
}

/// The rules the TLS servers run with.
const AUTHZ: &str = r#"
[[client]]
identity = "CN=host-a,O=blkshim-test"
disks = ["vm1"]
access = "rw"

[[client]]
identity = "CN=host-b,O=blkshim-test"
disks = ["vm1"]
access = "ro"

[[client]]
identity = "CN=host-c,O=blkshim-test"
disks = ["*"]
access = "rw"
advance = true
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `blkshim serve` on TCP with TLS (`tls`: `--tls` value, or `None` for
/// the default), the [`AUTHZ`] rules and disks vm1 and vm2.
fn tls_server(pki: &Pki, tls: Option<&str>, extra: &[&str]) -> (Server, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("authz.toml"), AUTHZ).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let server_dir = pki.server();
    let mut args = vec![
        "--listen",
        &listen,
        "--tls-certificates",
        &server_dir,
        "--config",
        "{dir}/authz.toml",
    ];
    if tls == Some("off") {
        // Plain TCP as before #15: no certificates, no rules.
        args = vec!["--listen", &listen];
    }
    if let Some(t) = tls {
        args.extend(["--tls", t]);
    }
    args.extend(extra);
    let srv = Server::start_in(dir, &["vm1", "vm2"], "16M", &args);
    (srv, listen)
}

fn nbds(listen: &str, export: &str, pki: &Pki, who: &str) -> String {
    format!(
        "nbds://{listen}/{export}?tls-certificates={}",
        pki.path(who).display()
    )
}

/// Run a libnbd tool with its debug log, which carries the server's
/// option-reply error messages (the tools print only the error code).
fn libnbd(tool: &str, args: &[&str]) -> Output {
    require(tool);
    Command::new(tool)
        .env("LIBNBD_DEBUG", "1")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what} failed:\n{}", text(&o));
    o
}

fn fails(o: Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} succeeded:\n{}", text(&o));
    text(&o)
}

/// nbdsh running `body` (Python; `h` is a handle with strict mode off, so
/// libnbd sends what the server's flags forbid and the server must refuse
/// it itself).
fn nbdsh(uri: &str, body: &str) -> Output {
    require("nbdsh");
    let script =
        format!("h.set_strict_mode(0)\nh.set_uri_allow_local_file(True)\nh.connect_uri({uri:?})\n{body}\nprint('SCRIPT OK')\n");
    // nbdsh runs `python3` from PATH; the system one has the nbd module.
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("nbdsh")
        .env("PATH", path)
        .env("LIBNBD_DEBUG", "1")
        .args(["-c", &script])
        .output()
        .expect("nbdsh")
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).expect("json")
}

#[test]
fn tcp_requires_tls_by_default_and_serves_nbds() {
    let pki = Pki::new();
    let (srv, listen) = tls_server(&pki, None, &[]);
    let info = ok(
        libnbd(
            "nbdinfo",
            &["--json", &nbds(&listen, "vm1", &pki, "host-a")],
        ),
        "nbdinfo over TLS as host-a",
    );
    let v = json(&info);
    assert_eq!(v["TLS"], true, "{v}");
    assert_eq!(v["exports"][0]["export-size"], 16 << 20);
    assert_eq!(v["exports"][0]["is_read_only"], false);
    assert!(srv
        .log()
        .contains("TLS started, client CN=host-a,O=blkshim-test"));

    // A plain client is told TLS is required, and gets nothing.
    let plain = format!("nbd://{listen}/vm1");
    let e = fails(libnbd("nbdinfo", &[&plain]), "plain nbdinfo against TLS");
    assert!(e.contains("TLS required"), "{e}");
    // The same plain client against --tls off: served.
    let (_off, off_listen) = tls_server(&pki, Some("off"), &[]);
    ok(
        libnbd("nbdinfo", &[&format!("nbd://{off_listen}/vm1")]),
        "plain nbdinfo against --tls off",
    );

    // LIST shows only what the identity may open: host-a has vm1 only,
    // host-c every disk.
    let list = |who| {
        let o = ok(
            libnbd(
                "nbdinfo",
                &["--list", "--json", &nbds(&listen, "", &pki, who)],
            ),
            "nbdinfo --list",
        );
        let v = json(&o);
        v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(list("host-a"), ["vm1"]);
    assert_eq!(list("host-c"), ["vm1", "vm2"]);
    // vm2 is not host-a's: refused as not authorized.
    let e = fails(
        libnbd("nbdinfo", &[&nbds(&listen, "vm2", &pki, "host-a")]),
        "host-a opening vm2",
    );
    assert!(e.contains("not authorized"), "{e}");
}

#[test]
fn tcp_without_certificates_or_tls_off_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--size",
            "1M",
            "vm1=vm1.img",
        ])
        .output()
        .unwrap();
    let e = text(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("--tls-certificates") && e.contains("--tls off"),
        "{e}"
    );
    assert!(!dir.path().join("vm1.img").exists(), "no disk touched");
}

#[test]
fn nbdcopy_round_trips_over_nbds_tcp_and_unix() {
    require("nbdcopy");
    let pki = Pki::new();
    let (srv, listen) = tls_server(&pki, None, &[]);
    let src = srv.path("src.bin");
    let back = srv.path("back.bin");
    std::fs::write(&src, random_bytes(16 << 20, 7)).unwrap();
    ok(
        libnbd(
            "nbdcopy",
            &[
                "--connections=4",
                src.to_str().unwrap(),
                &nbds(&listen, "vm1", &pki, "host-a"),
            ],
        ),
        "nbdcopy to nbds://",
    );
    // Back over the unix socket, which offers TLS when there are
    // certificates.
    let unix = format!(
        "nbds+unix:///vm1?socket={}&tls-certificates={}",
        srv.socket.display(),
        pki.path("host-a").display()
    );
    ok(
        libnbd("nbdcopy", &[&unix, back.to_str().unwrap()]),
        "nbdcopy from nbds+unix://",
    );
    let want = std::fs::read(&src).unwrap();
    assert!(std::fs::read(&back).unwrap() == want, "read back differs");
    assert!(
        std::fs::read(srv.image("vm1")).unwrap() == want,
        "image differs"
    );
}

#[test]
fn qemu_io_and_qemu_img_with_tls_creds_x509() {
    require("qemu-io");
    require("qemu-img");
    let pki = Pki::new();
    let (srv, listen) = tls_server(&pki, None, &[]);
    let port = listen.rsplit(':').next().unwrap();
    let object = |who: &str| {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.path(who).display()
        )
    };
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vm1,tls-creds=tls0"
    );
    let qemu_io = |who: &str, cmd: &str| {
        Command::new("qemu-io")
            .args(["--object", &object(who), "--image-opts", &opts, "-c", cmd])
            .output()
            .unwrap()
    };
    let w = ok(qemu_io("host-a", "write -P 0x5a 1M 1M"), "qemu-io write");
    assert!(text(&w).contains("wrote 1048576/1048576"), "{}", text(&w));
    let r = ok(qemu_io("host-a", "read -P 0x5a 1M 1M"), "qemu-io read");
    assert!(!text(&r).contains("Pattern verification failed"));
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[1 << 20..2 << 20].iter().all(|&b| b == 0x5a));
    let info = ok(
        Command::new("qemu-img")
            .args([
                "info",
                "--output=json",
                "--object",
                &object("host-a"),
                "--image-opts",
                &opts,
            ])
            .output()
            .unwrap(),
        "qemu-img info",
    );
    assert_eq!(json(&info)["virtual-size"], 16 << 20);
    // A certificate from another CA: refused in the TLS handshake.
    let e = fails(
        qemu_io("other", "read 0 512"),
        "qemu-io with another CA's certificate",
    );
    assert!(srv.log().contains("TLS handshake failed"), "{e}");
}

#[test]
fn client_certificates_must_come_from_the_ca() {
    let pki = Pki::new();
    let (srv, listen) = tls_server(&pki, None, &[]);
    // host-a's subject, signed by another CA.
    let e = fails(
        libnbd("nbdinfo", &[&nbds(&listen, "vm1", &pki, "other")]),
        "a certificate from another CA",
    );
    assert!(e.to_lowercase().contains("tls"), "{e}");
    // No certificate, with --tls-verify-peer (the default).
    fails(
        libnbd("nbdinfo", &[&nbds(&listen, "vm1", &pki, "nocert")]),
        "no client certificate",
    );
    assert!(srv.log().matches("TLS handshake failed").count() >= 2);
    // Beside them, the CA's own host-a.
    ok(
        libnbd("nbdinfo", &[&nbds(&listen, "vm1", &pki, "host-a")]),
        "host-a",
    );
    // With --tls-verify-peer false, no certificate is anonymous: the
    // handshake passes, and with [[client]] entries anonymous gets nothing.
    let (_srv2, l2) = tls_server(&pki, None, &["--tls-verify-peer", "false"]);
    let e = fails(
        libnbd("nbdinfo", &[&nbds(&l2, "vm1", &pki, "nocert")]),
        "anonymous",
    );
    assert!(e.contains("not authorized for anonymous"), "{e}");
}

#[test]
fn a_read_only_grant_reads_and_its_writes_are_refused() {
    let pki = Pki::new();
    let (srv, listen) = tls_server(&pki, None, &[]);
    std::fs::write(srv.image("vm1"), vec![0x11u8; 16 << 20]).unwrap();
    let info = ok(
        libnbd(
            "nbdinfo",
            &["--json", &nbds(&listen, "vm1", &pki, "host-b")],
        ),
        "nbdinfo as host-b",
    );
    assert_eq!(json(&info)["exports"][0]["is_read_only"], true);
    let read = nbdsh(
        &nbds(&listen, "vm1", &pki, "host-b"),
        "assert h.pread(4096, 0) == b'\\x11' * 4096",
    );
    ok(read, "host-b reading");
    // Strict mode off: libnbd sends the write; the server refuses it.
    let write = nbdsh(
        &nbds(&listen, "vm1", &pki, "host-b"),
        "import errno\ntry:\n    h.pwrite(b'\\x22' * 4096, 0)\n    raise SystemExit('write accepted')\nexcept nbd.Error as e:\n    assert e.errno == errno.EPERM or e.errno == 'EPERM', e\n    print('refused', e)",
    );
    let t = text(&ok(write, "host-b's write attempt"));
    assert!(t.contains("refused"), "{t}");
    // Beside it, host-a (rw) writes the same block.
    ok(
        nbdsh(
            &nbds(&listen, "vm1", &pki, "host-a"),
            "h.pwrite(b'\\x33' * 4096, 0)\nh.flush()",
        ),
        "host-a writing",
    );
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..4096].iter().all(|&b| b == 0x33), "host-a's write");
    assert!(srv.log().contains("read-only for this client"));
}

#[test]
fn only_an_identity_allowed_to_advance_may_take_over() {
    let pki = Pki::new();
    let (srv, listen) = tls_server(&pki, None, &[]);
    let epoch = || srv.disk_status("vm1")["current_epoch"].as_u64().unwrap();
    assert_eq!(epoch(), 0);
    // host-a: rw, no advance. vm1@1 is above the current epoch: refused
    // with the reason; vm1@0 (current) and vm1 (no epoch) work.
    let e = fails(
        libnbd("nbdinfo", &[&nbds(&listen, "vm1@1", &pki, "host-a")]),
        "host-a at vm1@1",
    );
    assert!(
        e.contains("CN=host-a,O=blkshim-test may not advance disk \"vm1\" (at epoch 0) to epoch 1"),
        "{e}"
    );
    assert!(srv.log().contains("may not advance"));
    ok(
        nbdsh(
            &nbds(&listen, "vm1@0", &pki, "host-a"),
            "h.pwrite(b'a' * 512, 0)",
        ),
        "host-a at the current epoch",
    );
    ok(
        libnbd("nbdinfo", &[&nbds(&listen, "vm1", &pki, "host-a")]),
        "host-a without an epoch",
    );
    assert_eq!(epoch(), 0);
    // host-c may advance: its write at vm1@1 takes the disk over.
    ok(
        nbdsh(
            &nbds(&listen, "vm1@1", &pki, "host-c"),
            "h.pwrite(b'c' * 512, 0)\nh.flush()",
        ),
        "host-c at vm1@1",
    );
    assert_eq!(epoch(), 1);
    // host-a now at 0 is stale; at 1 (current) it works again.
    fails(
        libnbd("nbdinfo", &[&nbds(&listen, "vm1@0", &pki, "host-a")]),
        "host-a at the old epoch",
    );
    ok(
        libnbd("nbdinfo", &[&nbds(&listen, "vm1@1", &pki, "host-a")]),
        "host-a at the new current epoch",
    );
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..512].iter().all(|&b| b == b'c'));
}

/// TLS-PSK (`--tls-psk`, OpenSSL): the username is the identity the rules
/// see. alice (rw on vm1) is served and round-trips data with nbdcopy and
/// qemu-io's tls-creds-psk; bob (a key but no rule) is refused as not
/// authorized; a wrong key for alice fails the TLS handshake; a plain
/// client is told TLS is required.
#[test]
fn tls_psk_usernames_are_identities() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let key = |seed: u64| -> String {
        random_bytes(32, seed)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let keys = dir.path().join("keys.psk");
    std::fs::write(&keys, format!("alice:{}\nbob:{}\n", key(1), key(2))).unwrap();
    let wrong = dir.path().join("wrong.psk");
    std::fs::write(&wrong, format!("alice:{}\n", key(3))).unwrap();
    // qemu reads DIR/keys.psk.
    let qemu_dir = dir.path().join("qemu");
    std::fs::create_dir(&qemu_dir).unwrap();
    std::fs::write(qemu_dir.join("keys.psk"), format!("alice:{}\n", key(1))).unwrap();
    std::fs::write(
        dir.path().join("authz.toml"),
        "[[client]]\nidentity = \"alice\"\ndisks = [\"vm1\"]\naccess = \"rw\"\n",
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let keys_arg = keys.display().to_string();
    let srv = Server::start_in(
        dir,
        &["vm1"],
        "8M",
        &[
            "--listen",
            &listen,
            "--tls-psk",
            &keys_arg,
            "--config",
            "{dir}/authz.toml",
        ],
    );
    let uri = |user: &str, file: &std::path::Path| {
        format!("nbds://{user}@{listen}/vm1?tls-psk-file={}", file.display())
    };
    let info = ok(
        libnbd("nbdinfo", &["--json", &uri("alice", &keys)]),
        "nbdinfo as alice",
    );
    assert_eq!(json(&info)["TLS"], true);
    assert!(srv.log().contains("TLS started, client alice"));
    let e = fails(libnbd("nbdinfo", &[&uri("bob", &keys)]), "bob");
    assert!(e.contains("not authorized for bob"), "{e}");
    fails(
        libnbd("nbdinfo", &[&uri("alice", &wrong)]),
        "alice with a wrong key",
    );
    assert!(srv.log().contains("TLS handshake failed"));
    let e = fails(
        libnbd("nbdinfo", &[&format!("nbd://{listen}/vm1")]),
        "plain client",
    );
    assert!(e.contains("TLS required"), "{e}");

    let src = srv.path("src.bin");
    let back = srv.path("back.bin");
    std::fs::write(&src, random_bytes(8 << 20, 5)).unwrap();
    ok(
        libnbd("nbdcopy", &[src.to_str().unwrap(), &uri("alice", &keys)]),
        "nbdcopy over PSK",
    );
    ok(
        libnbd("nbdcopy", &[&uri("alice", &keys), back.to_str().unwrap()]),
        "nbdcopy back over PSK",
    );
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
    let port = listen.rsplit(':').next().unwrap();
    let q = ok(
        Command::new("qemu-io")
            .args([
                "--object",
                &format!(
                    "tls-creds-psk,id=tls0,dir={},username=alice,endpoint=client",
                    qemu_dir.display()
                ),
                "--image-opts",
                &format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vm1,tls-creds=tls0"),
                "-c",
                "write -P 0x77 0 64k",
                "-c",
                "read -P 0x77 0 64k",
            ])
            .output()
            .unwrap(),
        "qemu-io with tls-creds-psk",
    );
    assert!(!text(&q).contains("Pattern verification failed"));
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..64 << 10].iter().all(|&b| b == 0x77));
}
