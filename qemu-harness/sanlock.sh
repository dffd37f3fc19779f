#!/bin/bash
# sanlock lease fencing on real sanlock daemons: boot the host-side guest
# (hostside-build.sh's kernel + busybox + LIO: one fileio LU exported twice,
# /dev/sda and /dev/sdb) with a payload of its own -- sanlock, wdmd, dmsetup
# (Debian packages, unpacked, never installed), the softdog and dm-mod
# modules of the guest's kernel, and blkshim built with `--features
# sanlock` -- and run hostside-sanlock.sh in it: two "hosts" (two sanlock
# daemons with their own SANLOCK_RUN_DIR and host ids, one wdmd) take a
# disk's lease through `blkshim lease` (SanlockFence), host A is cut off
# from the lease storage, its daemon kills A's writer, and B takes the lease
# at lver + 1 after host_dead_seconds.
#
#   qemu-harness/sanlock.sh [--accel tcg|kvm|auto] [--timeout S] [--keep]
#
# Prints the guest's `HOSTSIDE-RESULT <step> PASS|FAIL <evidence>` and
# `SANLOCK-TIME` lines and `N passed, M failed`; exits 0 only when every
# expected step passed. hostside.sh is not touched: the guest image is
# the same (cached), only the appended payload differs.
#
# env: ACCEL (default tcg), RUN_TIMEOUT (default 420 s), GUEST_MEM (default
# 1024 MiB), KEEP=1 keeps the work directory, HOSTSIDE_PROFILE=release,
# SANLOCK_IO_TIMEOUT (default 3; 1 makes wdmd let the watchdog fire, see
# hostside-sanlock.sh).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${CACHE:-$HERE/.cache}
ACCEL=${ACCEL:-tcg}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
GUEST_MEM=${GUEST_MEM:-1024}
KEEP=${KEEP:-0}

while [ $# -gt 0 ]; do
    case "$1" in
    --accel) ACCEL=$2; shift ;;
    --timeout) RUN_TIMEOUT=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "sanlock.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "sanlock: $*" >&2; }
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

EXPECTED="lio-setup modules dm-paths wdmd daemons init a-acquires b-refused-live
b-stale-epoch-refused cut-off a-killed b-acquires lver-advanced b-release catch-up watchdog-quiet"

# --- the guest image (shared with hostside.sh) and its packages -------------------
GUEST=$(bash "$HERE/hostside-build.sh" | tail -1)
log "guest $GUEST ready at $(elapsed) s"
. "$HERE/debs.sh" # cand, fetch
mkdir -p "$CACHE/debs"
WORK=$(mktemp -d /tmp/sanlock-harness.XXXXXX)
QPID=
cleanup() {
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then kill "$QPID" 2>/dev/null || true; fi
    if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

X=$WORK/debs
mkdir -p "$X"
for pkg in sanlock libsanlock1 libsanlock-client1 libaio1 dmsetup libdevmapper1.02.1; do
    ver=$(cand "$pkg")
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || { log "no candidate for $pkg (apt-get update?)"; exit 1; }
    dpkg -x "$(fetch "$pkg" "$ver")" "$X"
done
KREL=$(awk '{print $1}' "$GUEST/INFO" | sed 's/^linux-image-//')
KDEB=$(ls "$CACHE/debs/linux-image-${KREL}_"*.deb | sed -n 1p)
mkdir -p "$WORK/kernel"
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$WORK/kernel" --wildcards "./lib/modules/$KREL/kernel/drivers/*"
MODROOT=$WORK/kernel/lib/modules/$KREL
# Modules the base image already loads are skipped by the guest script.
MODS=$(python3 "$HERE/modorder.py" "$MODROOT" softdog dm-mod)
log "extra modules: $(echo $MODS)"

# --- blkshim with the sanlock fence -------------------------------------------
PROFILE_FLAG=; [ "${HOSTSIDE_PROFILE:-debug}" = release ] && PROFILE_FLAG=--release
log "cargo build $PROFILE_FLAG --features sanlock --bin blkshim"
(cd "$REPO" && cargo build $PROFILE_FLAG -q --features sanlock --bin blkshim) >&2
BLKSHIM_BIN=$REPO/target/${HOSTSIDE_PROFILE:-debug}/blkshim

# --- payload -------------------------------------------------------------------------
PAY=$WORK/payload-root
mkdir -p "$PAY/payload/modules" "$PAY/lib64" "$PAY/lib/x86_64-linux-gnu" "$PAY/sbin" "$PAY/etc"
strip -o "$PAY/payload/blkshim" "$BLKSHIM_BIN"
cp "$HERE/hostside-sanlock.sh" "$PAY/payload/run.sh"
echo "IO_TIMEOUT=${SANLOCK_IO_TIMEOUT:-3}" >"$PAY/payload/env"
cp "$X/usr/sbin/sanlock" "$X/usr/sbin/wdmd" "$X/sbin/dmsetup" "$PAY/sbin/"
for m in $MODS; do cp "$MODROOT/$m" "$PAY/payload/modules/"; done
echo "$MODS" | xargs -n1 basename >"$PAY/payload/modules/order"
# sanlock and wdmd look their socket group up; the initramfs has no passwd.
printf 'root:x:0:0:root:/:/bin/sh\nsanlock:x:179:179:sanlock:/:/bin/false\n' >"$PAY/etc/passwd"
printf 'root:x:0:\nsanlock:x:179:\n' >"$PAY/etc/group"
chmod 755 "$PAY/payload/run.sh" "$PAY/payload/blkshim" "$PAY/sbin/"*
LIBPATH=$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu
for bin in "$PAY/payload/blkshim" "$PAY/sbin/sanlock" "$PAY/sbin/wdmd" "$PAY/sbin/dmsetup"; do
    if LD_LIBRARY_PATH=$LIBPATH ldd "$bin" | awk '/not found/{n++} END{exit !n}'; then
        LD_LIBRARY_PATH=$LIBPATH ldd "$bin" >&2; log "missing libraries for $bin"; exit 1
    fi
    for l in $(LD_LIBRARY_PATH=$LIBPATH ldd "$bin" | awk '/=> \//{print $3}'); do
        cp -L "$l" "$PAY/lib/x86_64-linux-gnu/"
    done
done
cp -L /lib64/ld-linux-x86-64.so.2 "$PAY/lib64/"
(cd "$PAY" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc | gzip -1) >"$WORK/payload.cpio.gz"
cat "$GUEST/initrd.gz" "$WORK/payload.cpio.gz" >"$WORK/initrd.gz"
log "payload $(du -h "$WORK/payload.cpio.gz" | cut -f1) ready at $(elapsed) s"

# --- boot ------------------------------------------------------------------------------
case "$ACCEL" in
tcg) accel=(-accel tcg -cpu max) ;;
kvm) accel=(-accel kvm -cpu host) ;;
auto) if [ -w /dev/kvm ]; then accel=(-accel kvm -accel tcg -cpu max); else accel=(-accel tcg -cpu max); fi ;;
*) log "bad --accel $ACCEL"; exit 2 ;;
esac
CONSOLE=$WORK/console.log
log "booting ($ACCEL, ${GUEST_MEM} MiB, bound ${RUN_TIMEOUT} s); console: $CONSOLE"
BOOT_T=$(date +%s.%N)
qrc=0
# -no-reboot: a watchdog reset ends the run (and is reported) instead of looping.
timeout --kill-after=10 "$RUN_TIMEOUT" qemu-system-x86_64 "${accel[@]}" -m "$GUEST_MEM" -smp 1 \
    -machine q35 -nodefaults -no-reboot -display none -monitor none \
    -serial "file:$CONSOLE" \
    -kernel "$GUEST/vmlinuz" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init" >"$WORK/qemu.out" 2>&1 &
QPID=$!
wait "$QPID" || qrc=$?
QPID=
GUEST_S=$(awk -v a="$BOOT_T" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
[ "$qrc" = 124 ] && log "the guest did not finish in ${RUN_TIMEOUT} s (killed)"

# --- verdict --------------------------------------------------------------------------
tr -d '\r' <"$CONSOLE" >"$WORK/console.txt"
grep -E '^(HOSTSIDE-(BOOTED|WARN|GUEST-DONE)|SANLOCK-)' "$WORK/console.txt" >&2 || true
grep '^HOSTSIDE-RESULT ' "$WORK/console.txt" >"$WORK/results" || true
if ! grep -q '^HOSTSIDE-GUEST-DONE' "$WORK/console.txt"; then
    log "no HOSTSIDE-GUEST-DONE (a watchdog reset ends qemu with -no-reboot): last console lines:"
    tail -40 "$WORK/console.txt" >&2
fi
cat "$WORK/results"
passed=0 failed=0
for step in $EXPECTED; do
    line=$(grep -m1 "^HOSTSIDE-RESULT $step " "$WORK/results" || true)
    case "$line" in
    "HOSTSIDE-RESULT $step PASS"*) passed=$((passed + 1)) ;;
    "") echo "HOSTSIDE-RESULT $step FAIL missing (the guest never reported it)"; failed=$((failed + 1)) ;;
    *) failed=$((failed + 1)) ;;
    esac
done
for s in $(awk '$3 == "FAIL" {print $2}' "$WORK/results"); do
    case " $(echo $EXPECTED) " in *" $s "*) ;; *) failed=$((failed + 1)) ;; esac
done
log "guest ran ${GUEST_S} s, whole run $(elapsed) s"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
