#!/usr/bin/env bash
# The Debian package, really built and really run (extracted, then
# installed with dpkg -i and purged again):
# packaging/build-deb.sh builds it (the debug build unless --release: the
# same packaging, minutes cheaper), dpkg-deb -x extracts it into a scratch
# root, and this checks
#  - the files, their modes, the conffile and the control fields;
#  - the man pages render (man -l) and name the options;
#  - the extracted /usr/bin/blkshim serves the shipped example config
#    (its /run and /var/lib paths moved into the scratch root) under a
#    NOTIFY_SOCKET: READY=1 once the NBD socket answers, STOPPING=1 and
#    exit 0 at SIGTERM;
#  - systemd-analyze verify passes on the units as installed, with
#    /usr/bin/blkshim and the man pages of Documentation= from the package.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=--dev
[ "${1:-}" = --release ] && profile=

t0=$(date +%s)
bash packaging/build-deb.sh $profile
echo "package built in $(( $(date +%s) - t0 )) s"
deb=$(ls -t target/debian/blkshim_*.deb | head -1)
echo "package: $deb ($(du -h "$deb" | cut -f1))"

root=$(mktemp -d /tmp/blkshim-deb-XXXXXX)
trap 'rm -rf "$root"' EXIT
fail() { echo "package_deb: FAIL: $*" >&2; exit 1; }

dpkg-deb -x "$deb" "$root"
dpkg-deb -f "$deb" Package Version Architecture Depends Section
[ "$(dpkg-deb -f "$deb" Package)" = blkshim ] || fail "package name"
dpkg-deb -f "$deb" Depends | grep -q libc6 || fail "no \$auto dependencies"

for f in usr/bin/blkshim \
  lib/systemd/system/blkshim-serve@.service lib/systemd/system/blkshim-xen-backend.service \
  etc/blkshim/example.toml usr/share/doc/blkshim/README.md usr/share/doc/blkshim/copyright \
  usr/share/man/man1/blkshim.1.gz usr/share/man/man1/blkshim-serve.1.gz \
  usr/share/man/man1/blkshim-ctl.1.gz usr/share/man/man1/blkshim-ctl-status.1.gz \
  usr/share/man/man1/blkshim-xen-backend.1.gz; do
  [ -e "$root/$f" ] || fail "missing /$f"
done
[ -x "$root/usr/bin/blkshim" ] || fail "/usr/bin/blkshim not executable"
[ "$(stat -c %a "$root/lib/systemd/system/blkshim-serve@.service")" = 644 ] || fail "unit mode"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/blkshim/example.toml \
  || fail "/etc/blkshim/example.toml is not a conffile"
"$root/usr/bin/blkshim" --version

for page in blkshim blkshim-serve blkshim-xen-backend; do
  man -P cat -l "$root/usr/share/man/man1/$page.1.gz" >"$root/$page.txt" 2>/dev/null || fail "man $page"
done
grep -q -- '--fence-timeout' "$root/blkshim-serve.txt" || fail "blkshim-serve(1) lacks --fence-timeout"
grep -q -- '--epoch-dir' "$root/blkshim-xen-backend.txt" || fail "blkshim-xen-backend(1) lacks --epoch-dir"

# The shipped config, served by the shipped binary.
mkdir -p "$root/run/blkshim/example" "$root/var/lib/blkshim"
sed -e "s|/run/blkshim|$root/run/blkshim|g" -e "s|/var/lib/blkshim|$root/var/lib/blkshim|g" \
  "$root/etc/blkshim/example.toml" >"$root/example.toml"
python3 - "$root" <<'PY'
import os, signal, socket, subprocess, sys, time
root = sys.argv[1]
notify = os.path.join(root, "notify.sock")
n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
n.bind(notify)
n.settimeout(60)
srv = subprocess.Popen([root + "/usr/bin/blkshim", "serve", "--config", root + "/example.toml"],
                       env=dict(os.environ, NOTIFY_SOCKET=notify), stdout=subprocess.DEVNULL)
try:
    while True:
        msg = n.recv(4096).decode().splitlines()
        if "READY=1" in msg:
            break
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(root + "/run/blkshim/example/nbd.sock")  # at once: it must already accept
    s.settimeout(10)
    assert s.recv(8) == b"NBDMAGIC", "no NBD greeting"
    s.close()
    assert os.path.getsize(root + "/var/lib/blkshim/example-vm1.raw") == 10 << 30
    srv.send_signal(signal.SIGTERM)
    msg = n.recv(4096).decode().splitlines()
    assert "STOPPING=1" in msg, msg
    assert srv.wait(60) == 0, "serve did not exit 0"
finally:
    if srv.poll() is None:  # a failed check must not leave it running
        srv.kill()
        srv.wait()
print("extracted blkshim serve: READY=1 after the NBD socket answered, STOPPING=1, exit 0")
PY

# The units as installed: the system's own units beside them (what they
# order against), /usr/bin/blkshim and the man pages from the package.
mkdir -p "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
MANPATH="$root/usr/share/man" systemd-analyze verify --root="$root" \
  blkshim-serve@example.service blkshim-xen-backend.service 2>"$root/verify.err" \
  || { cat "$root/verify.err"; fail "systemd-analyze verify"; }
[ ! -s "$root/verify.err" ] || { cat "$root/verify.err"; fail "systemd-analyze verify warned"; }

# And for real, as an operator would: dpkg -i, the installed blkshim
# serves, the installed units verify; purged again at the end (a
# /usr/bin/blkshim that no package owned is put back).
backup=""
if [ -e /usr/bin/blkshim ] && ! dpkg -S /usr/bin/blkshim >/dev/null 2>&1; then
  backup=$(mktemp /tmp/blkshim-bin-XXXXXX); cp -a /usr/bin/blkshim "$backup"
fi
trap 'dpkg --purge blkshim >/dev/null 2>&1 || true; [ -z "$backup" ] || mv "$backup" /usr/bin/blkshim; rm -rf "$root"' EXIT
dpkg -i "$deb" >"$root/dpkg.log" 2>&1 || { cat "$root/dpkg.log"; fail "dpkg -i"; }
dpkg -L blkshim | grep -qx /usr/bin/blkshim || fail "dpkg -L blkshim lacks /usr/bin/blkshim"
/usr/bin/blkshim --version
mkdir -p "$root/installed"
python3 - "$root/installed" <<'PY'
import os, signal, socket, subprocess, sys, time
d = sys.argv[1]
srv = subprocess.Popen(["/usr/bin/blkshim", "serve", "--socket", d + "/nbd.sock", "--control", d + "/ctl.sock",
                        "--state-dir", d + "/state", "--size", "1M", "vm1=" + d + "/vm1.img"],
                       stdout=subprocess.DEVNULL)
try:
    t = time.time()
    while not os.path.exists(d + "/nbd.sock"):
        assert time.time() - t < 30 and srv.poll() is None, "the installed blkshim did not start serving"
        time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d + "/nbd.sock")
    s.settimeout(10)
    assert s.recv(8) == b"NBDMAGIC", "no NBD greeting"
    s.close()
    srv.send_signal(signal.SIGTERM)
    assert srv.wait(60) == 0, "serve did not exit 0"
finally:
    if srv.poll() is None:
        srv.kill()
        srv.wait()
print("dpkg -i: /usr/bin/blkshim serves (NBD greeting), exits 0 at SIGTERM")
PY
systemd-analyze verify blkshim-serve@example.service blkshim-xen-backend.service 2>"$root/verify-installed.err" \
  || { cat "$root/verify-installed.err"; fail "systemd-analyze verify of the installed units"; }
[ ! -s "$root/verify-installed.err" ] || { cat "$root/verify-installed.err"; fail "systemd-analyze verify of the installed units warned"; }
echo "dpkg -i: the installed units verify"
echo "package_deb: OK ($(( $(date +%s) - t0 )) s)"
