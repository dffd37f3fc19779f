#!/usr/bin/env python3
"""qemu live-migration and fencing harness (python3 stdlib only).

Boots the guest built by build-guest.sh with its disk on an NBD export, and
runs the scenarios named in SCENARIOS (default: all):

  migrate   fio with crc32c verification runs in the guest while the VM is
            live-migrated MIGRATIONS times between two qemu processes, each
            one opening the disk at the next epoch (blkshim: the disk's epoch
            must have advanced to it after each migration); then a final
            whole-disk verify in the guest and a host-side verify of the
            image. Each fio round stamps its blocks with its number and
            writes every block, so every block must carry the last round's
            stamp: a valid block of an earlier round is stale. At the end a
            writer of the first epoch replays an early round's valid block:
            blkshim must refuse it (an unfenced server lands it, and only
            the round check catches it).
  held-at-storage
            a live migration with the source's writes held at the storage
            (blkshim --storage-delay, armed by a file): qemu's switchover
            drains them, none is left when the destination takes over. Then
            a source cut off (frozen) with writes held at the storage while
            a pre-booted destination takes over and rewrites the same
            blocks: once with the held
            writes landing before the drain deadline (drain), once past it
            (fence at --fence-timeout); the destination's overlapping writes
            must land after the held ones both times.
  cutoff    (a) the source is frozen with writes held in a proxy; the VM is
            started fresh at the next epoch and rewrites the blocks; the held
            writes are released: they must not land.
  failover  (b) the source is SIGKILLed mid-write, the VM starts fresh at the
            next epoch, the dead source's late writes must not land.
  failback  (c) after failover, move back to a third qemu at the next epoch;
            the second writer's late writes and fresh writes from every old
            epoch must not land.
  reconnect (vhost-user-blk, blkshim) blkshim is restarted RESTARTS times
            under the guest's fio verify load; qemu (chardev reconnect=1)
            picks the disk up again; the guest's I/O must resume and every
            block verify.

Configuration is by environment (see README.md); run.sh sets the defaults.
Exit status: 0 if every scenario passed, 1 otherwise.
"""
import atexit
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from holdproxy import HoldProxy  # noqa: E402
from vhostproxy import VhostHoldProxy  # noqa: E402
from qmp import QMP, QMPError  # noqa: E402

ENV = os.environ.get
NBD_SERVER = ENV("NBD_SERVER", "qemu-nbd")
# nbd: each qemu opens the disk over NBD (export vm1@EPOCH); vhost-user-blk:
# each qemu gets a vhost-user-blk socket of its own, added at its epoch with
# `blkshim ctl vhost-add` (guest RAM a shared memfd, so the backend maps it).
TRANSPORT = ENV("TRANSPORT", "nbd")
VHOST_QUEUES = int(ENV("VHOST_QUEUES", "2"))
BLKSHIM = ENV("BLKSHIM", "blkshim")
# {sock} {img} {size} {name} {ctl} {state} are substituted; split like a shell
# would. Each server gets its own control socket and epoch store, so scenarios
# (each with a fresh disk starting at epoch 5) do not share epochs.
BLKSHIM_ARGS = ENV("BLKSHIM_ARGS", "serve --socket {sock} --control {ctl} --state-dir {state} "
                                   "--cache none {name}={img} --size {size}")
DISK_MB = int(ENV("DISK_MB", "64"))
MIGRATIONS = int(ENV("MIGRATIONS", "4"))
MIG_INTERVAL = float(ENV("MIG_INTERVAL", "5"))  # seconds of load between migrations
STRICT = ENV("STRICT_SWITCHOVER", "0") == "1"  # pause-before-switchover
# Run at the strict hand-off point ({epoch} {sock} {name} {img} substituted),
# e.g. a command that admits the next epoch on the server.
HANDOFF_CMD = ENV("HANDOFF_CMD", "")
if not HANDOFF_CMD and NBD_SERVER == "blkshim":
    HANDOFF_CMD = shlex.quote(BLKSHIM) + " ctl --control {ctl} handoff {name} --to {epoch}"
MEM = ENV("GUEST_MEM", "256M")
ACCEL = ENV("ACCEL", "auto")
KVM_PROBE_TIMEOUT = float(ENV("KVM_PROBE_TIMEOUT", "20"))
BOOT_TIMEOUT = float(ENV("BOOT_TIMEOUT", "120"))
FIO_FINISH_TIMEOUT = float(ENV("FIO_FINISH_TIMEOUT", "300"))
MIN_ROUNDS = int(ENV("FIO_MIN_ROUNDS", "1"))
REGION_KB = int(ENV("WRITER_REGION_KB", "1024"))
# held-at-storage: how long blkshim's --storage-delay holds a write, and the
# drain deadline (--fence-timeout), shorter than the delay.
HELD_DELAY = float(ENV("HELD_DELAY", "10"))
HELD_FENCE_TIMEOUT = float(ENV("HELD_FENCE_TIMEOUT", "4"))
FIRST_EPOCH = int(ENV("FIRST_EPOCH", "5"))
# reconnect (blkshim restarted under the guest) is vhost-user-blk's alone,
# and has no unfenced control.
SCENARIOS = ENV("SCENARIOS", "migrate,held-at-storage,cutoff,failover,failback" + (
    ",reconnect" if TRANSPORT == "vhost-user-blk" and NBD_SERVER == "blkshim" else "")).split(",")
GUEST = ENV("GUEST_DIR")
QEMU = ENV("QEMU", "qemu-system-x86_64")
EXPORT = "vm1"
EXPECT_FAULTS = ENV("EXPECT_FAULTS", "pass")  # "fail": unfenced server self-test
FAULT_SCENARIOS = ("migrate", "held-at-storage", "cutoff", "failover", "failback")

T0 = time.monotonic()
CHILDREN = []  # every process we started, killed on exit


def now():
    return time.monotonic() - T0


def log(msg):
    print(f"[{now():7.1f}s] {msg}", flush=True)


def kill_children():
    for p in CHILDREN:
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in CHILDREN:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


atexit.register(kill_children)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, lambda s, f: sys.exit(128 + s))


def spawn(argv, logfile):
    out = open(logfile, "ab")
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    CHILDREN.append(p)
    return p


def wait_connectable(path, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited (rc={proc.returncode}) before {path} appeared")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise RuntimeError(f"{path} not connectable after {timeout}s")


class NbdServer:
    """The NBD server under test: blkshim, or qemu-nbd (no fencing)."""

    def __init__(self, workdir, tag, img, size, extra_args=()):
        self.sock = os.path.join(workdir, f"{tag}.nbd.sock")
        self.ctl = os.path.join(workdir, f"{tag}.ctl.sock")
        self.state = os.path.join(workdir, f"{tag}.epochs")
        self.img, self.size, self.tag = img, size, tag
        self.logfile = os.path.join(workdir, f"{tag}.server.log")
        if NBD_SERVER == "blkshim":
            subst = {"sock": self.sock, "img": img, "size": str(size), "name": EXPORT,
                     "ctl": self.ctl, "state": self.state}
            argv = [BLKSHIM] + [a.format(**subst) for a in shlex.split(BLKSHIM_ARGS)]
            argv += list(extra_args)
        elif NBD_SERVER == "qemu-nbd" and TRANSPORT == "vhost-user-blk":
            # The unfenced control of the vhost-user-blk runs: qemu-storage-
            # daemon serves the image over NBD (export vm1, for the replay)
            # and, added over QMP, one vhost-user-blk socket per qemu.
            self.qmp_path = os.path.join(workdir, f"{tag}.qsd.qmp.sock")
            argv = ["qemu-storage-daemon",
                    "--blockdev", f"driver=file,node-name=f,filename={img},cache.direct=on,aio=io_uring",
                    "--nbd-server", f"addr.type=unix,addr.path={self.sock},max-connections=32",
                    "--export", f"type=nbd,id=nbd0,node-name=f,name={EXPORT},writable=on",
                    "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
                    "--monitor", "chardev=m"]
        elif NBD_SERVER == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "raw", f"--socket={self.sock}", "-x", EXPORT,
                    "--shared=32", "-t", "--cache=none", "--aio=native", img]
        else:
            raise SystemExit(f"NBD_SERVER must be blkshim or qemu-nbd, not {NBD_SERVER}")
        log(f"nbd server ({NBD_SERVER}): {' '.join(argv)}")
        self.proc = spawn(argv, self.logfile)
        wait_connectable(self.sock, 20, self.proc)
        SERVERS[self.sock] = self

    @staticmethod
    def export(epoch):
        """Export name a writer at `epoch` connects to (qemu-nbd has no epochs)."""
        return EXPORT if NBD_SERVER == "qemu-nbd" else f"{EXPORT}@{epoch}"

    def uri(self, epoch):
        return f"nbd+unix:///{self.export(epoch)}?socket={self.sock}"

    def status(self):
        """blkshim's `ctl status` of the disk (epoch, in flight, fenced...);
        None for qemu-nbd."""
        if NBD_SERVER != "blkshim":
            return None
        for d in self._status().get("disks", []):
            if d.get("name") == EXPORT:
                return d
        raise RuntimeError(f"no disk {EXPORT} in the server's status")

    def vhost_socket(self, epoch, who=None, node="f"):
        """A vhost-user-blk socket of the disk at `epoch`, for the qemu
        named `who` (default: one per epoch). qemu-storage-daemon has no
        epochs: its socket exports block node `node` (the image itself, or
        a held path's nbdkit)."""
        name = who or f"e{epoch}"
        path = os.path.join(os.path.dirname(self.sock), f"{self.tag}.{name}.vhost")
        if NBD_SERVER != "blkshim":  # qemu-storage-daemon: no epochs
            q = QMP(self.qmp_path)
            try:
                q.cmd("block-export-add", **{
                    "type": "vhost-user-blk", "id": f"vu-{name}", "node-name": node,
                    "addr": {"type": "unix", "path": path}, "writable": True,
                    "num-queues": VHOST_QUEUES})
            finally:
                q.close()
            self.vhost_ids = getattr(self, "vhost_ids", {})
            self.vhost_ids[path] = f"vu-{name}"
            log(f"qemu-storage-daemon vhost-user-blk socket {path} (no epochs)")
            return path
        r = self._status({"cmd": "vhost_add", "disk": EXPORT, "epoch": epoch, "socket": path})
        if not r.get("ok", False):
            raise RuntimeError(f"vhost_add {path}: {r}")
        log(f"vhost-user-blk socket {path} at epoch {epoch}")
        return path

    def vhost_remove(self, path):
        if NBD_SERVER != "blkshim":
            q = QMP(self.qmp_path)
            try:
                q.cmd("block-export-del", id=self.vhost_ids.pop(path))
            finally:
                q.close()
            return
        r = self._status({"cmd": "vhost_remove", "socket": path})
        log(f"vhost-user-blk socket {path} removed: {r.get('ok')}")

    def _status(self, req=None):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(self.ctl)
            s.sendall(json.dumps(req or {"cmd": "status"}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        finally:
            s.close()
        return json.loads(buf)

    def refused_stale(self):
        """Requests and connections the disk refused as stale so far
        (blkshim's control socket: the disk's own count, which each
        connection's and vhost socket's counts break down); None for
        qemu-nbd, which has no such notion."""
        if NBD_SERVER != "blkshim":
            return None
        return int(self.status()["refused_stale"])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


SERVERS = {}  # NBD socket path -> NbdServer, so a Guest can ask it for a vhost socket
# qemu-storage-daemon over vhost-user-blk: a held path's nbdkit socket ->
# (its NbdServer, the qsd block node reading through that nbdkit).
HELD_NODES = {}


class Console:
    """Reads a qemu serial socket in a thread; lines get host timestamps."""

    def __init__(self, path, logfile, sink):
        self.path, self.sink = path, sink
        self.lines = []
        self.cond = threading.Condition()
        self.log = open(logfile, "a")
        self.sock = None
        self.closed = False

    def connect(self, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serial socket {self.path} not connectable")
                time.sleep(0.05)
        self.sock = s
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").replace("\r", "")
                t = now()
                self.log.write(f"{t:9.3f} {line}\n")
                self.log.flush()
                with self.cond:
                    self.lines.append((t, line))
                    if self.sink is not None:
                        self.sink.append((t, line))
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, pattern, timeout, start=0):
        """First line (from index `start`) matching regex; raises on timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i][1])
                    if m:
                        return m, i
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise RuntimeError(f"console {self.path}: no line matching {pattern!r} "
                                       f"({'console closed' if self.closed else f'{timeout}s timeout'})")
                self.cond.wait(min(left, 0.5))

    def send(self, text):
        self.sock.sendall(text.encode())


class Guest:
    """One qemu process running the harness guest."""

    def __init__(self, workdir, name, accel, append, disk_sock=None, export=None,
                 incoming=False, sink=None, vhost=None, reconnect=False):
        self.name = name
        self.qmp_path = os.path.join(workdir, f"{name}.qmp.sock")
        self.ser_path = os.path.join(workdir, f"{name}.serial.sock")
        self.logfile = os.path.join(workdir, f"{name}.serial.log")
        argv = [QEMU, "-machine", "q35", "-accel", accel, "-m", MEM, "-smp", "1",
                "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", os.path.join(GUEST, "vmlinuz"),
                "-initrd", os.path.join(GUEST, "initrd.gz"),
                "-append", "console=ttyS0 panic=-1 quiet rootfstype=ramfs " + append,
                "-chardev", f"socket,id=ser0,path={self.ser_path},server=on,wait=off",
                "-serial", "chardev:ser0",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if vhost is None and disk_sock and TRANSPORT == "vhost-user-blk":
            # A scenario written for NBD (socket + export vm1@EPOCH): the
            # server gives this qemu a vhost-user-blk socket at that epoch.
            srv, node = SERVERS.get(disk_sock), "f"
            if srv is None and disk_sock in HELD_NODES:
                srv, node = HELD_NODES[disk_sock]
            if srv is None:
                raise RuntimeError(f"{name}: no server serves {disk_sock} (vhost-user-blk "
                                   "needs the gateway itself, not an NBD proxy)")
            epoch = int(export.rsplit("@", 1)[1]) if "@" in export else 0
            vhost = srv.vhost_socket(epoch, name, node)
        if vhost:
            argv += ["-object", f"memory-backend-memfd,id=mem,size={MEM},share=on",
                     "-numa", "node,memdev=mem",
                     "-chardev", f"socket,id=vu0,path={vhost}" + (",reconnect=1" if reconnect else ""),
                     "-device", f"vhost-user-blk-pci,chardev=vu0,num-queues={VHOST_QUEUES},id=vd0"]
        elif disk_sock:
            argv += ["-blockdev", f"driver=nbd,node-name=nbd0,server.type=unix,"
                                  f"server.path={disk_sock},export={export},cache.direct=on",
                     "-device", "virtio-blk-pci,drive=nbd0,id=vd0"]
        argv += ["-incoming", "defer"] if incoming else ["-S"]
        self.t_start = now()
        self.proc = spawn(argv, os.path.join(workdir, f"{name}.qemu.log"))
        with open(os.path.join(workdir, f"{name}.argv"), "w") as f:
            f.write(shlex.join(argv) + "\n")
        wait_connectable(self.qmp_path, 20, self.proc)
        self.qmp = QMP(self.qmp_path)
        self.console = Console(self.ser_path, self.logfile, sink)
        self.console.connect()
        if not incoming:
            self.qmp.cmd("cont")

    @property
    def pid(self):
        return self.proc.pid

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def quit(self):
        if self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
            except (QMPError, OSError):
                pass
            if not self.wait_exit(10):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.qmp.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def probe_accel(workdir):
    if ACCEL in ("kvm", "tcg"):
        log(f"accelerator forced: {ACCEL}")
        return ACCEL
    if not os.path.exists("/dev/kvm"):
        log("no /dev/kvm: using tcg")
        return "tcg"
    g = None
    try:
        g = Guest(workdir, "kvm-probe", "kvm", "hw.mode=probe")
        g.console.wait_for("HARNESS-PROBE-OK", KVM_PROBE_TIMEOUT)
        log("kvm probe printed its marker: using kvm")
        return "kvm"
    except Exception as e:  # any failure (start, hang, timeout) means tcg
        log(f"kvm probe failed ({e}): using tcg")
        return "tcg"
    finally:
        if g is not None:
            g.kill()


def make_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


# --------------------------------------------------------------------------
# Scenario: live migration under fio load
# --------------------------------------------------------------------------

def fio_progress(events):
    """(t, ios done so far) from the guest's terse status lines, across rounds."""
    out, base, last = [], 0, 0
    for t, line in events:
        if line.startswith("HARNESS-ROUND-START"):
            base += last
            last = 0
        elif line.startswith("HARNESS-FIO 3;"):
            f = line[len("HARNESS-FIO "):].split(";")
            try:
                kb = int(f[5]) + int(f[46])
            except (IndexError, ValueError):
                continue
            last = kb // 4
            out.append((t, base + last))
    return out


def rate(progress, t0, t1):
    """IOPS between host times t0 and t1 (interpolated from status samples)."""
    if t1 - t0 < 0.5 or len(progress) < 2:
        return None

    def at(t):
        prev = None
        for ts, n in progress:
            if ts >= t:
                if prev is None:
                    return None
                pt, pn = prev
                return pn + (n - pn) * (t - pt) / max(ts - pt, 1e-9)
            prev = (ts, n)
        return None

    a, b = at(t0), at(t1)
    if a is None or b is None:
        return None
    return (b - a) / (t1 - t0)


def migrate(src, dst, uri, epoch, srv, timeout=180):
    src.qmp.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "events", "state": True},
        {"capability": "pause-before-switchover", "state": STRICT}])
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
    dst.qmp.cmd("migrate-incoming", uri=uri)
    t0 = now()
    src.qmp.cmd("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    paused_at = None
    while True:
        info = src.qmp.cmd("query-migrate")
        st = info.get("status")
        if st == "pre-switchover" and paused_at is None:
            # Strict hand-off point: the source is stopped and its disk
            # flushed and inactivated; nothing of the source can write any
            # more. Here a controller would admit the next epoch.
            paused_at = now()
            if HANDOFF_CMD:
                log(f"pre-switchover: source stopped; hand-off to epoch {epoch}")
                cmd = HANDOFF_CMD.format(epoch=epoch, sock=srv.sock, name=EXPORT, img=srv.img,
                                         ctl=srv.ctl)
                h = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
                if h.returncode != 0:
                    src.qmp.cmd("migrate_cancel")
                    raise RuntimeError(f"hand-off command failed: {cmd}: {h.stderr.strip()}")
            src.qmp.cmd("migrate-continue", state="pre-switchover")
        if st == "completed":
            break
        if st in ("failed", "cancelled"):
            raise RuntimeError(f"migration {st}: {info.get('error-desc', info)}")
        if time.monotonic() > deadline:
            src.qmp.cmd("migrate_cancel")
            raise RuntimeError(f"migration timed out after {timeout}s: {info}")
        time.sleep(0.05)
    t1 = now()
    # qemu flips the status to "completed" a moment before it fills in
    # total-time and downtime; read again until they are there.
    for _ in range(40):
        if info.get("total-time") and info.get("downtime") is not None:
            break
        time.sleep(0.05)
        info = src.qmp.cmd("query-migrate")
    ram = info.get("ram", {})
    for _ in range(100):
        if dst.qmp.cmd("query-status").get("status") == "running":
            break
        time.sleep(0.05)
    else:
        raise RuntimeError("destination not running after migration")
    return {"t0": t0, "t1": t1, "total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"), "setup_ms": info.get("setup-time"),
            "ram_mb": ram.get("transferred", 0) / 1e6, "dirty_syncs": ram.get("dirty-sync-count"),
            "strict_pause": paused_at is not None}


def round_of(block):
    """The fio round a 4 KiB block was written in (guest-init.sh stamps round
    N's blocks with 0x5247NNNN after the crc32c header); None if unstamped."""
    tail = block[-8:]
    if block[:2] != b"\xca\xac" or tail[:2] != b"RG" or tail[:4] != tail[4:]:
        return None
    return int.from_bytes(tail[2:4], "big")


def round_census(img):
    """Count the image's 4 KiB blocks by the round they carry."""
    counts = {}
    with open(img, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            for i in range(0, len(chunk), 4096):
                r = round_of(chunk[i:i + 4096])
                counts[r] = counts.get(r, 0) + 1
    return counts


def wait_epoch(srv, epoch, timeout=90):
    """Poll blkshim's status until the disk is at `epoch` (the destination's
    first write advances it; a guest in its round's read-only verify pass
    writes again only when the next round starts); the epoch seen last.
    None for qemu-nbd."""
    if NBD_SERVER != "blkshim":
        return None
    deadline = time.monotonic() + timeout
    while True:
        cur = srv.status()["current_epoch"]
        if cur >= epoch or time.monotonic() > deadline:
            return cur
        time.sleep(0.1)


def stale_replay(srv, epoch, offset, block, workdir):
    """Replay an earlier round's valid block at `offset` from an old epoch's
    writer; True if the server refused it."""
    src = os.path.join(workdir, "stale-block.bin")
    with open(src, "wb") as f:
        f.write(block)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -s {src} {offset} 4096",
                        srv.uri(epoch)], capture_output=True, text=True, timeout=30)
    out = (r.stdout + r.stderr).strip()
    refused = r.returncode != 0 or "failed" in out.lower()
    log(f"replay of round {round_of(block)}'s block at {offset} from old epoch {epoch}: "
        f"{'refused' if refused else 'ACCEPTED'} ({(out.splitlines() or [''])[-1]})")
    return refused


def wait_event(events, pattern, timeout):
    """Wait for a line matching `pattern` on any console feeding `events`
    (a migrated guest's earlier lines are on its earlier hosts' consoles)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while not any(rx.search(line) for _, line in list(events)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no console line matching {pattern!r} after {timeout}s")
        time.sleep(0.2)


def save_early_block(img, events, offset=4096 * 100):
    """After round 1 ended, a copy of one block (round 1's, or round 2's if
    round 2 already rewrote it); None before that."""
    if not any(line.startswith("HARNESS-ROUND-END 1 ") for _, line in events):
        return None
    with open(img, "rb") as f:
        f.seek(offset)
        block = f.read(4096)
    if round_of(block) is None:
        raise RuntimeError(f"block at {offset} carries no round stamp after round 1")
    log(f"saved the block at {offset} (round {round_of(block)}) to replay at the end")
    return offset, block


def check_image(img, result_line):
    """The host's checks of a fio guest's image once it stopped: every block
    carries a valid crc32c header, and the last round's stamp (every round
    writes every block once, so an older round's block is valid but stale).
    (host check ok, last round, {older round: blocks})."""
    hc = subprocess.run(["fio", "--name=hostcheck", f"--filename={img}", "--rw=read", "--bs=4k",
                         "--size=100%", "--verify=crc32c", "--output-format=terse"],
                        capture_output=True, text=True, timeout=300)
    host_ok = hc.returncode == 0 and "verify:" not in hc.stderr
    if not host_ok:
        log(f"host check errors: {hc.stderr.strip()[:2000]}")
    rounds_m = re.search(r"rounds=(\d+)", result_line)
    rounds = int(rounds_m.group(1)) if rounds_m else 0
    census = round_census(img)
    stale_rounds = {r: n for r, n in census.items() if r != rounds}
    log(f"blocks by round: {census} (last round {rounds}); host crc32c check "
        f"{'ok' if host_ok else 'FAILED'}")
    return host_ok, rounds, stale_rounds


def stop_fio_guest(g):
    """Tell a fio guest to stop after its round and verify; (its result
    line, its final verify match)."""
    g.console.send("stop\n")
    m, _ = g.console.wait_for(r"HARNESS-RESULT (PASS|FAIL)", FIO_FINISH_TIMEOUT)
    fin, _ = g.console.wait_for(r"HARNESS-FINAL-VERIFY rc=(\d+) errors=(\d+)", 5)
    g.wait_exit(30)
    g.quit()
    return m.string, fin


def scenario_migrate(workdir, accel):
    size = DISK_MB << 20
    img = os.path.join(workdir, "migrate.img")
    make_image(img, size)
    srv = NbdServer(workdir, "migrate", img, size)
    events = []  # all consoles' lines, in host time order
    epoch = FIRST_EPOCH
    append = "hw.mode=fio"
    vhost = TRANSPORT == "vhost-user-blk"
    vsock = srv.vhost_socket(epoch) if vhost else None
    g = Guest(workdir, f"mig-e{epoch}", accel, append, srv.sock, srv.export(epoch), sink=events,
              vhost=vsock)
    g.console.wait_for("HARNESS-BOOTED", BOOT_TIMEOUT)
    boot_s = now() - g.t_start
    log(f"booted in {boot_s:.1f}s (qemu start to /init marker), disk export {srv.export(epoch)}")
    g.console.wait_for("HARNESS-FIO 3;", BOOT_TIMEOUT)
    log("fio is running")
    time.sleep(MIG_INTERVAL)
    results = []
    saved = None  # (offset, block): a valid block of an early round, replayed at the end
    for i in range(1, MIGRATIONS + 1):
        if saved is None:
            saved = save_early_block(img, events)
        epoch += 1
        dst_vsock = srv.vhost_socket(epoch) if vhost else None
        dst = Guest(workdir, f"mig-e{epoch}", accel, append, srv.sock, srv.export(epoch),
                    incoming=True, sink=events, vhost=dst_vsock)
        uri = f"unix:{os.path.join(workdir, f'mig{i}.sock')}"
        r = migrate(g, dst, uri, epoch, srv)
        # The next migration only once this host's epoch is the disk's: every
        # host must have taken the disk over (written) before it moves on.
        t_mig = now()
        seen = wait_epoch(srv, epoch)
        r.update(n=i, src=g.name, dst=dst.name, epoch=epoch, seen_epoch=seen,
                 advance_s=now() - t_mig)
        results.append(r)
        log(f"migration {i}: {g.name} -> {dst.name} total {r['total_ms']} ms, "
            f"downtime {r['downtime_ms']} ms, {r['ram_mb']:.0f} MB, disk epoch "
            f"{'n/a' if seen is None else seen}"
            + (f" ({r['advance_s']:.1f}s after)" if seen is not None and r["advance_s"] > 1 else "")
            + (", paused pre-switchover for the hand-off" if r["strict_pause"] else ""))
        if STRICT and not r["strict_pause"]:
            raise RuntimeError("strict hand-off requested but the migration never paused")
        g.quit()
        if vhost:
            srv.vhost_remove(vsock)
            vsock = dst_vsock
        g = dst
        time.sleep(max(0.0, MIG_INTERVAL - (now() - t_mig)))
    # The replayed block must be older than the last round: that round
    # starts before the stop (the guest finishes the round it is in).
    wait_event(events, r"HARNESS-ROUND-END 1 ", FIO_FINISH_TIMEOUT)
    if saved is None:
        saved = save_early_block(img, events)
    wait_event(events, rf"HARNESS-ROUND-START {round_of(saved[1]) + 1}$", FIO_FINISH_TIMEOUT)
    log("migrations done: telling the guest to stop fio and verify")
    result_line, fin = stop_fio_guest(g)
    # A writer of the first epoch replays a valid block of an early round:
    # blkshim must refuse it; an unfenced server lands it, and only the
    # round check below can tell it from good data (its crc32c is valid).
    replay_refused = stale_replay(srv, FIRST_EPOCH, saved[0], saved[1], workdir)
    srv.stop()

    host_ok, rounds, stale_rounds = check_image(img, result_line)

    prog = fio_progress(events)
    print()
    print(f"{'#':>2} {'from':>10} {'to':>10} {'epoch':>5} {'total ms':>9} {'downtime ms':>11} {'setup ms':>8} "
          f"{'RAM MB':>7} {'IOPS 3s before':>14} {'IOPS 1s from start':>18} {'IOPS 3s after':>13}")
    for r in results:
        w = 3.0
        b, d, a = (rate(prog, r["t0"] - w, r["t0"]), rate(prog, r["t0"], max(r["t1"], r["t0"] + 1.0)),
                   rate(prog, r["t1"], r["t1"] + w))
        fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
        ep = "-" if r["seen_epoch"] is None else r["seen_epoch"]
        print(f"{r['n']:>2} {r['src']:>10} {r['dst']:>10} {ep:>5} {r['total_ms']:>9} {r['downtime_ms']:>11} "
              f"{r['setup_ms']:>8} {r['ram_mb']:>7.0f} {fmt(b):>14} {fmt(d):>18} {fmt(a):>13}")
    if prog:
        span = prog[-1][0] - prog[0][0]
        log(f"fio overall: {prog[-1][1]} ios in {span:.0f}s = {prog[-1][1] / max(span, 1):.0f} IOPS "
            f"(4k randwrite+verify reads, as counted by the guest)")
    epochs = [r["seen_epoch"] for r in results]
    epochs_ok = NBD_SERVER != "blkshim" or epochs == [r["epoch"] for r in results]
    ok = ("PASS" in result_line and int(fin.group(2)) == 0 and host_ok and rounds >= MIN_ROUNDS
          and len(results) == MIGRATIONS and epochs_ok and not stale_rounds and replay_refused)
    detail = (f"{len(results)} migrations, disk epochs after each: "
              f"{epochs if NBD_SERVER == 'blkshim' else 'n/a (qemu-nbd)'}"
              f"{'' if epochs_ok else ' (NOT ADVANCED AT EACH)'}, guest: {result_line.strip()}, "
              f"final verify errors={fin.group(2)}, host crc32c check "
              f"{'ok' if host_ok else 'FAILED'}, blocks of an older round than {rounds}: "
              f"{stale_rounds or 'none'}, replay of round {round_of(saved[1])}'s block from "
              f"epoch {FIRST_EPOCH}: {'refused' if replay_refused else 'ACCEPTED'}, "
              f"boot {boot_s:.1f}s")
    return ok, detail, bool(stale_rounds)


RESTARTS = int(ENV("RESTARTS", "3"))  # reconnect: blkshim restarts under load
# reconnect: how blkshim is stopped. TERM (a restart, an upgrade) quiesces
# each frontend first; KILL (a crash) cannot: what that loses is measured.
RESTART_SIGNAL = ENV("RESTART_SIGNAL", "TERM")


def vq_state(g):
    """qemu's view of each virtqueue of the guest's disk (for a log)."""
    out = []
    for q in range(VHOST_QUEUES):
        try:
            st = g.qmp.cmd("x-query-virtio-queue-status",
                           path="/machine/peripheral/vd0/virtio-backend", queue=q)
            out.append({k: st.get(k) for k in ("last-avail-idx", "shadow-avail-idx",
                                               "used-idx", "inuse", "signalled-used",
                                               "signalled-used-valid")})
        except (QMPError, OSError) as e:
            out.append(str(e))
    return f"qemu's virtqueues: {out}"


def scenario_reconnect(workdir, accel):
    """vhost-user-blk: blkshim restarts (SIGTERM, then the same command)
    RESTARTS times under the guest's fio verify load; qemu's chardev has
    reconnect=1 and picks the disk up again at the same epoch. No request
    may be lost (the guest's I/O must resume) and every block must verify."""
    if TRANSPORT != "vhost-user-blk":
        return False, "reconnect runs over vhost-user-blk only (--transport vhost-user-blk)", None
    if NBD_SERVER != "blkshim":
        return False, "reconnect restarts blkshim: it has no unfenced control", None
    size = DISK_MB << 20
    img = os.path.join(workdir, "reconnect.img")
    make_image(img, size)
    srv = NbdServer(workdir, "reconnect", img, size)
    events = []
    epoch = FIRST_EPOCH
    vsock = srv.vhost_socket(epoch, "rc")
    g = Guest(workdir, f"rc-e{epoch}", accel, "hw.mode=fio", sink=events, vhost=vsock,
              reconnect=True)
    g.console.wait_for("HARNESS-BOOTED", BOOT_TIMEOUT)
    g.console.wait_for("HARNESS-FIO 3;", BOOT_TIMEOUT)
    log("fio is running")
    time.sleep(MIG_INTERVAL)
    gaps = []
    for i in range(1, RESTARTS + 1):
        before = (fio_progress(events) or [(0, 0)])[-1][1]
        t0 = now()
        if RESTART_SIGNAL == "KILL":
            srv.proc.kill()
            srv.proc.wait(timeout=10)
        else:
            srv.stop()
        t_down = now() - t0
        srv = NbdServer(workdir, "reconnect", img, size)
        srv.vhost_socket(epoch, "rc")
        # I/O has resumed once the guest's progress passes what it was
        # before the stop (its status lines come every second).
        deadline = time.monotonic() + 120
        while (fio_progress(events) or [(0, 0)])[-1][1] <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"restart {i}: the guest's I/O did not resume in 120 s "
                                   f"(progress stuck at {before} ios); {vq_state(g)}; "
                                   f"blkshim: {srv.status()}")
            time.sleep(0.2)
        gap = now() - t0
        st = srv.status()
        gaps.append(gap)
        log(f"restart {i}: blkshim stopped (SIG{RESTART_SIGNAL}) in {t_down:.1f}s, guest I/O resumed {gap:.1f}s after "
            f"the stop; disk epoch {st['current_epoch']}")
        time.sleep(MIG_INTERVAL)
    wait_event(events, r"HARNESS-ROUND-END 1 ", FIO_FINISH_TIMEOUT)
    log("restarts done: telling the guest to stop fio and verify")
    result_line, fin = stop_fio_guest(g)
    srv.stop()
    host_ok, rounds, stale_rounds = check_image(img, result_line)
    ok = ("PASS" in result_line and int(fin.group(2)) == 0 and host_ok
          and rounds >= MIN_ROUNDS and not stale_rounds and len(gaps) == RESTARTS)
    return ok, (f"{len(gaps)} restarts of blkshim (SIG{RESTART_SIGNAL}) under load, guest I/O resumed after "
                f"{', '.join(f'{x:.1f}s' for x in gaps)}; guest: {result_line.strip()}, "
                f"final verify errors={fin.group(2)}, host crc32c check "
                f"{'ok' if host_ok else 'FAILED'}, blocks of an older round than {rounds}: "
                f"{stale_rounds or 'none'}"), None


# --------------------------------------------------------------------------
# Fault scenarios
# --------------------------------------------------------------------------

def pattern(epoch):
    return 0xB15C0000 + epoch


def region_census(img, pats):
    """Count the region's 4 KiB blocks by which writer's pattern they hold."""
    names = {pattern(e).to_bytes(4, "big") * 1024: f"epoch{e}" for e in pats}
    names[b"\x55" * 4096] = "old-epoch-probe"
    names[b"\0" * 4096] = "zero"
    counts = {}
    with open(img, "rb") as f:
        for _ in range(REGION_KB // 4):
            blk = f.read(4096)
            k = names.get(blk, "other")
            counts[k] = counts.get(k, 0) + 1
    return counts


def verdict_of(census, newest, released, refused_before, refused_after, extra_ok=True):
    """(ok, stale): ok when every region block holds the newest writer's
    pattern and, with blkshim, the held writes reached the server after
    release and were refused as stale; stale when blocks of an older epoch
    landed (the reason an unfenced server must fail for)."""
    stale = any(n > 0 for k, n in census.items()
                if k.startswith("epoch") and int(k[5:]) < newest)
    ok = census.get(f"epoch{newest}", 0) == REGION_KB // 4 and extra_ok
    if refused_before is not None:
        # The held stale writes must really have reached blkshim (answered
        # after release) and been refused there, not lost on the way.
        ok = ok and released["answered_after_release"] > 0 and refused_after > refused_before
    return ok, stale


def writer(workdir, accel, srv, epoch, proxy, forever, tag):
    """A guest writing its epoch's pattern over the region, through `proxy`
    (a hold proxy, or an NBD socket path) or, with None, straight to the
    server."""
    append = f"hw.mode=writer hw.pattern=0x{pattern(epoch):08x} hw.region={REGION_KB}k"
    if forever:
        append += " hw.forever=1"
    name = f"{tag}-e{epoch}"
    if isinstance(proxy, str):
        return Guest(workdir, name, accel, append, proxy, srv.export(epoch))
    if TRANSPORT == "vhost-user-blk":
        vhost = proxy.listen if proxy is not None else srv.vhost_socket(epoch, name)
        return Guest(workdir, name, accel, append, vhost=vhost)
    via = proxy.listen if proxy is not None else srv.sock
    return Guest(workdir, name, accel, append, via, srv.export(epoch))


def hold_proxy(workdir, name, srv, epoch):
    """A proxy that can hold a writer's requests on their way to `srv`.
    NBD: the bytes on the socket. vhost-user-blk: the kicks, so requests
    stay in the virtqueues (vhostproxy.py), on a socket of the disk at
    `epoch` of the proxy's own."""
    if TRANSPORT == "vhost-user-blk":
        upstream = srv.vhost_socket(epoch, name)
        return VhostHoldProxy(os.path.join(workdir, f"{name}.vproxy.sock"), upstream).start()
    return HoldProxy(os.path.join(workdir, f"{name}.proxy.sock"), srv.sock).start()


def held_desc(proxy):
    """What the proxy holds, for the log."""
    if isinstance(proxy, VhostHoldProxy):
        st = proxy.stats()
        return (f"{proxy.pending()} requests held in its virtqueues "
                f"({st['kicks_held']} kicks held by the proxy)")
    return f"{proxy.stats()['held_bytes']} bytes held in the proxy"


def hold_inflight(proxy, guest):
    """Hold the guest's requests until writes are caught in flight."""
    proxy.hold()
    if isinstance(proxy, VhostHoldProxy):
        # One request left in a ring, unseen by an idle backend, is enough.
        if not proxy.wait_held(1, 30):
            raise RuntimeError(f"no requests of {guest.name} caught in its rings: "
                               f"{proxy.stats()}, pending {proxy.pending()}")
        return
    # One NBD write request = 28-byte header + 4 KiB payload: one complete
    # held write is enough to test that a stale write cannot land (under a
    # loaded TCG guest fewer than the writer's iodepth may be caught).
    if not proxy.wait_held(28 + 4096, 30):
        raise RuntimeError(f"no writes caught in flight from {guest.name}: {proxy.stats()}")
    time.sleep(0.5)


def release_and_settle(proxy):
    """Release what the proxy holds and wait for the server to answer it.
    answered_after_release: NBD, the reply bytes; vhost-user-blk, the
    requests the backend completed (used ring) after the release."""
    if isinstance(proxy, VhostHoldProxy):
        held = proxy.pending()
        before = proxy.completed()
        proxy.release()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proxy.completed() == before:
            time.sleep(0.05)
        time.sleep(1.0)  # let the server finish what it took
        st = proxy.stats()
        st["answered_after_release"] = (proxy.completed() - before) & 0xFFFF
        st["released"] = f"{held} held requests ({st['kicks_released']} kicks)"
        return st
    before = proxy.stats()["bytes_down"]
    proxy.release()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and proxy.stats()["bytes_down"] == before:
        time.sleep(0.05)
    time.sleep(1.0)  # let the server finish what it accepted
    st = proxy.stats()
    st["answered_after_release"] = st["bytes_down"] - before
    st["released"] = f"{st['released_bytes']} held bytes"
    return st


def released_desc(st):
    unit = "requests" if TRANSPORT == "vhost-user-blk" else "bytes"
    return (f"released {st['released']}, server answered {st['answered_after_release']} "
            f"{unit} after release")


def run_fresh_writer(workdir, accel, srv, epoch, tag):
    """Start the VM fresh at `epoch`; it writes its pattern and verifies it."""
    g = writer(workdir, accel, srv, epoch, None, forever=False, tag=tag)
    g.console.wait_for("HARNESS-BOOTED", BOOT_TIMEOUT)
    m, _ = g.console.wait_for(r"HARNESS-(WRITER-VERIFIED|RESULT FAIL.*)", 120)
    if "VERIFIED" not in m.group(0):
        raise RuntimeError(f"{g.name}: {m.group(0)}")
    g.wait_exit(30)
    g.kill()
    return g


def scenario_cutoff(workdir, accel):
    size = DISK_MB << 20
    img = os.path.join(workdir, "cutoff.img")
    make_image(img, size)
    srv = NbdServer(workdir, "cutoff", img, size)
    e = FIRST_EPOCH
    pa = hold_proxy(workdir, "cutoff-a", srv, e)
    a = writer(workdir, accel, srv, e, pa, True, "cutoff")
    a.console.wait_for("HARNESS-WRITER-LOOPING", BOOT_TIMEOUT)
    time.sleep(1)
    hold_inflight(pa, a)
    os.kill(a.pid, signal.SIGSTOP)
    log(f"source {a.name} frozen (SIGSTOP) with {held_desc(pa)}")
    run_fresh_writer(workdir, accel, srv, e + 1, "cutoff")
    log(f"destination at epoch {e + 1} wrote and verified its blocks; releasing the held writes")
    r0 = srv.refused_stale()
    st = release_and_settle(pa)
    r1 = srv.refused_stale()
    a.kill()
    pa.stop()
    srv.stop()
    census = region_census(img, [e, e + 1])
    ok, stale = verdict_of(census, e + 1, st, r0, r1)
    return ok, (f"region blocks by writer: {census} ({released_desc(st)}, "
                f"refused as stale {r0}->{r1})"), stale


FAILOVER_STATE = {}


def scenario_failover(workdir, accel):
    size = DISK_MB << 20
    img = os.path.join(workdir, "failover.img")
    make_image(img, size)
    srv = NbdServer(workdir, "failover", img, size)
    e = FIRST_EPOCH
    pa = hold_proxy(workdir, "fo-a", srv, e)
    a = writer(workdir, accel, srv, e, pa, True, "fo")
    a.console.wait_for("HARNESS-WRITER-LOOPING", BOOT_TIMEOUT)
    time.sleep(1)
    hold_inflight(pa, a)
    a.kill()
    log(f"source {a.name} SIGKILLed with {held_desc(pa)}")
    # The VM starts fresh on the destination from the same disk, and keeps
    # writing afterwards (the failback scenario cuts it off in turn).
    pb = hold_proxy(workdir, "fo-b", srv, e + 1)
    b = writer(workdir, accel, srv, e + 1, pb, True, "fo")
    b.console.wait_for("HARNESS-WRITER-VERIFIED", BOOT_TIMEOUT)
    b.qmp.cmd("stop")  # pause B so its own rewrites cannot hide a stale write
    r0 = srv.refused_stale()
    st = release_and_settle(pa)
    r1 = srv.refused_stale()
    census = region_census(img, [e, e + 1])
    b.qmp.cmd("cont")
    pa.stop()
    FAILOVER_STATE.update(srv=srv, img=img, b=b, pb=pb, epoch=e + 1)
    ok, stale = verdict_of(census, e + 1, st, r0, r1)
    return ok, (f"region blocks by writer: {census} ({released_desc(st)}, "
                f"refused as stale {r0}->{r1})"), stale


def old_epoch_write(srv, epoch, offset):
    """A fresh write from an old epoch; True if the server refused it."""
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x55 {offset} 4096",
                        srv.uri(epoch)], capture_output=True, text=True, timeout=30)
    refused = r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
    last = ((r.stdout + r.stderr).strip().splitlines() or [""])[-1]
    log(f"fresh write at old epoch {epoch}: {'refused' if refused else 'ACCEPTED'} ({last})")
    return refused


def scenario_failback(workdir, accel):
    if not FAILOVER_STATE:
        return False, "needs the failover scenario first", None
    srv, img, b, pb, e = (FAILOVER_STATE[k] for k in ("srv", "img", "b", "pb", "epoch"))
    b.console.wait_for("HARNESS-WRITER-LOOPING", 30)
    time.sleep(1)
    hold_inflight(pb, b)
    b.kill()
    log(f"{b.name} SIGKILLed with {held_desc(pb)}; failing back at epoch {e + 1}")
    run_fresh_writer(workdir, accel, srv, e + 1, "fb")
    r0 = srv.refused_stale()
    st = release_and_settle(pb)
    r1 = srv.refused_stale()
    pb.stop()
    refused = [old_epoch_write(srv, old, 4096 * i) for i, old in enumerate((e - 1, e))]
    time.sleep(0.5)
    srv.stop()
    census = region_census(img, [e - 1, e, e + 1])
    ok, stale = verdict_of(census, e + 1, st, r0, r1, all(refused))
    return ok, (f"region blocks by writer: {census} ({released_desc(st)}, "
                f"refused as stale {r0}->{r1}); "
                f"fresh writes from epochs {e - 1},{e} refused: {refused}"), stale or not all(refused)


# --------------------------------------------------------------------------
# Scenario: writes held at the storage across a hand-off
# --------------------------------------------------------------------------

class HeldPath:
    """A source writer's path to the storage, which can hold its writes there.

    blkshim: the one gateway, run with `--storage-delay write=HELD_DELAY,
    armed-file=F`: while F exists, writes wait HELD_DELAY at the storage
    (already admitted by the tracker: in flight). F is removed before the
    destination goes, so the destination's writes would overtake the held
    ones unless blkshim orders them. qemu-nbd has no way to hold a write it
    received, so the unfenced control gives each source its own nbdkit (file
    plugin, pause filter) on the same image: paused, the writes it received
    wait there until it is resumed after the destination wrote."""

    def __init__(self, workdir, tag, srv, armed_file):
        self.srv, self.armed_file = srv, armed_file
        if NBD_SERVER == "blkshim":
            self.sock, self.ctl = srv.sock, None
            return
        self.sock = os.path.join(workdir, f"{tag}.nbdkit.sock")
        self.ctl = os.path.join(workdir, f"{tag}.pause.sock")
        argv = ["nbdkit", "-f", "-U", self.sock, "--filter=pause", "file", srv.img,
                f"pause-control={self.ctl}"]
        log(f"source path (nbdkit, pause filter): {' '.join(argv)}")
        proc = spawn(argv, os.path.join(workdir, f"{tag}.nbdkit.log"))
        wait_connectable(self.sock, 20, proc)
        wait_connectable(self.ctl, 20, proc)
        if TRANSPORT == "vhost-user-blk":
            # qemu-storage-daemon reads this source's disk through the
            # nbdkit: a block node of its own, exported per qemu.
            node = f"{tag}-nbd"
            q = QMP(srv.qmp_path)
            try:
                q.cmd("blockdev-add", **{"driver": "nbd", "node-name": node,
                                         "server": {"type": "unix", "path": self.sock}})
            finally:
                q.close()
            HELD_NODES[self.sock] = (srv, node)

    def _pause_ctl(self, cmd):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(self.ctl)
            s.sendall(cmd)
            reply = s.recv(1)
        if reply != cmd.upper():
            raise RuntimeError(f"nbdkit pause filter answered {reply!r} to {cmd!r}")

    def hold(self):
        if self.ctl is None:
            open(self.armed_file, "w").close()
        else:
            self._pause_ctl(b"p")

    def before_go(self):
        """blkshim: disarm, so that the destination's writes are not held."""
        if self.ctl is None:
            os.unlink(self.armed_file)
            time.sleep(0.3)  # blkshim looks for the file every 50 ms

    def after_destination(self):
        """Let the held writes land: blkshim, wait until they have left the
        storage; nbdkit, resume."""
        if self.ctl is None:
            deadline = time.monotonic() + HELD_DELAY + 10
            while self.srv.status()["in_flight"] > 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("held writes still in flight long after their delay")
                time.sleep(0.2)
        else:
            self._pause_ctl(b"r")
            time.sleep(2)


def held_across_advance(logfile, epoch):
    """True if blkshim's log shows writes held at the storage when the disk
    advanced to `epoch`: the last hold event before the advance is a hold,
    not the release of every held I/O."""
    last = None
    with open(logfile, errors="replace") as f:
        for line in f:
            if f"epoch {epoch - 1} -> {epoch};" in line:
                return last == "holding"
            if "storage delay: holding I/Os" in line:
                last = "holding"
            elif "storage delay: released every held I/O" in line:
                last = "released"
    return False


def held_writer(workdir, accel, srv, epoch, sock, forever):
    append = (f"hw.mode=writer hw.pattern=0x{pattern(epoch):08x} hw.region={REGION_KB}k "
              f"hw.wait=1" + (" hw.forever=1" if forever else ""))
    return Guest(workdir, f"held-e{epoch}", accel, append, sock, srv.export(epoch))


def held_migration(workdir, srv, src, dst, path, epoch):
    """Live-migrate `src` to `dst` (at `epoch`) with `src`'s writes held at
    the storage (blkshim); the delay is disarmed before the migration, so
    only those are held."""
    time.sleep(1)
    held = None
    if NBD_SERVER == "blkshim":
        path.hold()
        time.sleep(1.5)
        # A loaded TCG guest may take a moment to send its next writes.
        deadline = time.monotonic() + 10
        while srv.status()["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        held = srv.status()["in_flight"]
        path.before_go()
        if held == 0:
            raise RuntimeError(f"no write of {src.name} held at the storage before the migration")
    r = migrate(src, dst, f"unix:{os.path.join(workdir, 'held-mig.sock')}", epoch, srv)
    seen = wait_epoch(srv, epoch, 60)
    ok = True
    detail = f"downtime {r['downtime_ms']} ms, total {r['total_ms']} ms"
    if held is not None:
        at_advance = held_across_advance(srv.logfile, epoch)
        ok = seen == epoch and not at_advance
        detail = (f"held at the storage before it: {held} writes, {detail}, disk epoch {seen}, "
                  f"{'STILL HELD' if at_advance else 'none held'} at the epoch's advance")
    log(f"live migration to epoch {epoch}: {detail}")
    return {"ok": ok, "detail": detail}


def held_handoff(srv, img, src, path, dst, epoch, go_after, looping_dst):
    """Hold `src`'s writes at the storage, freeze it, and `go_after` seconds
    after the hold let the pre-booted `dst` (at `epoch`) write and verify the
    same region; then let the held writes land and count the region."""
    time.sleep(1)
    path.hold()
    t_hold = now()
    time.sleep(1.5)  # the looping source's next writes reach the storage and wait there
    os.kill(src.pid, signal.SIGSTOP)
    path.before_go()
    time.sleep(max(0.0, t_hold + go_after - now()))
    st_go = srv.status()
    if st_go is not None and st_go["in_flight"] == 0:
        raise RuntimeError(f"no write of {src.name} in flight at the storage at the hand-off")
    dst.console.send("go\n")
    t_go = now()
    m, _ = dst.console.wait_for(r"HARNESS-(WRITER-VERIFIED|RESULT FAIL.*)", 120)
    took = now() - t_go
    if "VERIFIED" not in m.group(0):
        raise RuntimeError(f"{dst.name}: {m.group(0)}")
    if looping_dst:
        dst.qmp.cmd("stop")  # its own rewrites must not hide a stale write
    path.after_destination()
    st = srv.status()
    census = region_census(img, range(FIRST_EPOCH, epoch + 1))
    if looping_dst:
        dst.qmp.cmd("cont")
    r = {"census": census, "took": took, "epoch": epoch,
         "stale": any(n > 0 for k, n in census.items()
                      if k.startswith("epoch") and int(k[5:]) < epoch),
         "ok": census.get(f"epoch{epoch}", 0) == REGION_KB // 4}
    if st is not None:
        r.update(held_at_go=st_go["in_flight"], fenced=st["fenced"] - st_go["fenced"],
                 disk_epoch=st["current_epoch"],
                 held_at_advance=held_across_advance(srv.logfile, epoch))
    log(f"hand-off to epoch {epoch}: {r}")
    return r


def scenario_held(workdir, accel):
    size = DISK_MB << 20
    img = os.path.join(workdir, "held.img")
    make_image(img, size)
    armed = os.path.join(workdir, "held.armed")
    srv = NbdServer(workdir, "held", img, size, [
        "--storage-delay", f"write={HELD_DELAY}s,armed-file={armed}",
        "--fence-timeout", f"{HELD_FENCE_TIMEOUT}s"])
    e = FIRST_EPOCH
    pa = HeldPath(workdir, "held-a", srv, armed)
    pb = HeldPath(workdir, "held-b", srv, armed)
    a = writer(workdir, accel, srv, e, pa.sock, True, "held")
    a.console.wait_for("HARNESS-WRITER-LOOPING", BOOT_TIMEOUT)
    # A clean live migration first, its source's writes held at the storage:
    # qemu's switchover drains them (the downtime absorbs the delay), so
    # none is left at the storage when the destination takes the disk.
    a2 = Guest(workdir, f"held-e{e + 1}", accel,
               f"hw.mode=writer hw.pattern=0x{pattern(e):08x} hw.region={REGION_KB}k hw.forever=1",
               pa.sock, srv.export(e + 1), incoming=True)
    live = held_migration(workdir, srv, a, a2, pa, e + 1)
    a.quit()
    b = held_writer(workdir, accel, srv, e + 2, pb.sock, forever=True)
    b.console.wait_for("HARNESS-WRITER-WAITING", BOOT_TIMEOUT)
    # Drain: the source is cut off (frozen) with writes held; the
    # destination's first write comes when they have less than the drain
    # deadline left: they land (acknowledged) first, and its overlapping
    # writes after them.
    drain = held_handoff(srv, img, a2, pa, b, e + 2,
                         HELD_DELAY - HELD_FENCE_TIMEOUT + 0.5, looping_dst=True)
    a2.kill()
    c = held_writer(workdir, accel, srv, e + 3, srv.sock, forever=False)
    c.console.wait_for("HARNESS-WRITER-WAITING", BOOT_TIMEOUT)
    b.console.wait_for("HARNESS-WRITER-LOOPING", 30)
    # Fence: the destination goes at once; the deadline passes while the
    # held writes are still at the storage: they are fenced (never
    # acknowledged) and the destination's overlapping writes still wait.
    fence = held_handoff(srv, img, b, pb, c, e + 3, 0, looping_dst=False)
    b.kill()
    srv.stop()
    ok = drain["ok"] and fence["ok"] and live["ok"]
    if NBD_SERVER == "blkshim":
        # The cut-off hand-offs must have happened with writes held at the
        # storage (the server's log), and the second past the drain deadline.
        ok = (ok and drain["held_at_advance"] and fence["held_at_advance"]
              and fence["fenced"] > 0 and fence["disk_epoch"] == e + 3)

    def say(name, r):
        how = ""
        if "fenced" in r:
            fate = ("drained (none fenced)" if r["fenced"] == 0
                    else f"{r['fenced']} fenced at the deadline")
            how = (f"{r['held_at_go']} in flight at the go, "
                   f"{'still held' if r['held_at_advance'] else 'NOT held'} at the epoch's advance, "
                   f"{fate}, ")
        return (f"{name} -> epoch {r['epoch']}: {how}destination wrote+verified in "
                f"{r['took']:.1f}s, region {r['census']}")
    how = (f"write delay {HELD_DELAY}s, fence timeout {HELD_FENCE_TIMEOUT}s"
           if NBD_SERVER == "blkshim" else "each source's writes held in its own nbdkit (pause)")
    return ok, (f"{how}; live migration: {live['detail']}; "
                f"{say('drain', drain)}; {say('fence', fence)}"), drain["stale"] or fence["stale"]


SCENARIO_FUNCS = {"migrate": scenario_migrate, "held-at-storage": scenario_held,
                  "cutoff": scenario_cutoff,
                  "failover": scenario_failover, "failback": scenario_failback,
                  "reconnect": scenario_reconnect}


def main():
    if not GUEST:
        raise SystemExit("GUEST_DIR not set (run build-guest.sh, or use run.sh)")
    workdir = ENV("WORKDIR") or tempfile.mkdtemp(prefix="qh-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    log(f"workdir {workdir}, nbd server {NBD_SERVER}, transport {TRANSPORT}, guest {GUEST}")
    if TRANSPORT not in ("nbd", "vhost-user-blk"):
        raise SystemExit(f"TRANSPORT must be nbd or vhost-user-blk, not {TRANSPORT}")
    accel = probe_accel(workdir)
    results = []
    for name in SCENARIOS:
        name = name.strip()
        if not name:
            continue
        fn = SCENARIO_FUNCS.get(name)
        if fn is None:
            raise SystemExit(f"unknown scenario {name}; known: {', '.join(SCENARIO_FUNCS)}")
        log(f"=== scenario {name} ===")
        t = now()
        stale = None
        try:
            ok, detail, *rest = fn(workdir, accel)
            stale = rest[0] if rest else None
            verdict = "PASS" if ok else "FAIL"
        except Exception as ex:  # could not run its checks at all
            verdict, detail = "ERROR", f"{type(ex).__name__}: {ex}"
        # With --expect-unfenced (qemu-nbd), a fault scenario must FAIL, and
        # for its reason: blocks of an older epoch landed after the newer
        # writer's (or an old epoch's fresh write was accepted). A FAIL for
        # anything else (a setup error, a lost write) does not count.
        if EXPECT_FAULTS == "fail" and name in FAULT_SCENARIOS:
            good = verdict == "FAIL" and stale is True
            verdict += " (expected, stale data landed)" if good else " (expected a stale landing!)"
        else:
            good = verdict == "PASS"
        results.append((name, good, verdict, detail, now() - t))
        log(f"scenario {name}: {verdict} ({now() - t:.0f}s) {detail}")
    # Anything a scenario left running (the failover guest, servers) goes now.
    kill_children()
    if ENV("KEEP_IMAGES", "0") != "1":  # logs stay; the disk images go
        for f in os.listdir(workdir):
            if f.endswith(".img"):
                os.unlink(os.path.join(workdir, f))
    print()
    print(f"NBD server: {NBD_SERVER}   transport: {TRANSPORT}   accel: {accel}   workdir: {workdir}")
    for name, good, verdict, detail, dt in results:
        print(f"  {verdict:<22} {name:<9} {dt:5.0f}s  {detail}")
    all_ok = bool(results) and all(good for _, good, _, _, _ in results)
    print("OVERALL:", "PASS" if all_ok else "FAIL")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
