#!/bin/bash
# Host-side fencing on a real SCSI target: boot a qemu guest whose LIO
# exports one fileio backstore through two tcm_loop targets (/dev/sda and
# /dev/sdb: two I_T nexuses onto one LU) and run seeds/002's SCSI-3
# persistent-reservation validation through blkshim's PrFencing
# (tests/pr_lio.rs) and the `blkshim pr` command line in it.
#
#   qemu-harness/hostside.sh [--accel tcg|kvm|auto] [--timeout S] [--keep]
#
# Prints the guest's `HOSTSIDE-RESULT <step> PASS|FAIL <evidence>` lines and
# `N passed, M failed`; exits 0 only when every expected step passed. The
# guest (kernel, busybox, LIO modules from Debian packages) is built once by
# hostside-build.sh and cached in qemu-harness/.cache/; blkshim
# (`cargo build`, HOSTSIDE_PROFILE=release for an optimised one) and the pr_lio test binary
# (`cargo test --no-run --test pr_lio`) are built on the host and
# appended to the initramfs with their ldd libraries at every run.
#
# env: ACCEL (default tcg), RUN_TIMEOUT (guest run bound, default 240 s),
# GUEST_MEM (default 1024 MiB), GUEST_RUST_LOG (default warn), KEEP=1 keeps
# the work directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ACCEL=${ACCEL:-tcg}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
GUEST_MEM=${GUEST_MEM:-1024}
KEEP=${KEEP:-0}

while [ $# -gt 0 ]; do
    case "$1" in
    --accel) ACCEL=$2; shift ;;
    --timeout) RUN_TIMEOUT=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "hostside.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "hostside: $*" >&2; }
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# The steps that must each print PASS (a missing one counts as failed).
EXPECTED="lio-setup transport baseline-io register-a reserve-a read-pr unregistered-preempt-refused
register-b reserve-b-refused nonholder-write-ebade holder-write unregister-b defend preempt-newer
old-holder-write-ebade data-check old-holder-reregister-refused release clear access-restored
foreign-key-untouched foreign-reservation cleanup pr_lio-binary cli-takeover cli-keys
cli-stale-takeover-refused cli-preempt-newer cli-dd-fenced-write cli-stale-register-conflict
cli-reservation cli-clear cli-cleared"

# --- host tools --------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v python3 >/dev/null || need+=(python3)
command -v strip >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -q >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi

# --- the guest -----------------------------------------------------------------
GUEST=$(bash "$HERE/hostside-build.sh" | tail -1)
log "guest $GUEST ($(cat "$GUEST/INFO" 2>/dev/null | cut -c1-80)...) ready at $(elapsed) s"

# --- the binaries --------------------------------------------------------------
# Debug by default: CI's `cargo test` built both already, and the guest
# (TCG), not the binaries, sets the pace. HOSTSIDE_PROFILE=release for the other.
PROFILE_FLAG=; [ "${HOSTSIDE_PROFILE:-debug}" = release ] && PROFILE_FLAG=--release
log "cargo build $PROFILE_FLAG --bin blkshim; cargo test $PROFILE_FLAG --no-run --test pr_lio"
(cd "$REPO" && cargo build $PROFILE_FLAG -q --bin blkshim) >&2
BLKSHIM_BIN=$REPO/target/${HOSTSIDE_PROFILE:-debug}/blkshim
PR_LIO=$(cd "$REPO" && cargo test $PROFILE_FLAG --no-run -q --test pr_lio --message-format=json |
    python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "pr_lio":
        print(m["executable"])' | tail -1)
[ -x "$PR_LIO" ] || { log "cannot find the pr_lio test binary"; exit 1; }
log "binaries built at $(elapsed) s"

WORK=$(mktemp -d /tmp/hostside.XXXXXX)
QPID=
cleanup() {
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then kill "$QPID" 2>/dev/null || true; fi
    if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PAY=$WORK/payload-root
mkdir -p "$PAY/payload" "$PAY/lib64"
strip -o "$PAY/payload/blkshim" "$BLKSHIM_BIN"
strip -o "$PAY/payload/pr_lio" "$PR_LIO"
cp "$HERE/hostside-guest.sh" "$PAY/payload/run.sh"
chmod 755 "$PAY/payload/"*
for bin in "$PAY/payload/blkshim" "$PAY/payload/pr_lio"; do
    if ldd "$bin" | grep -q 'not found'; then ldd "$bin" >&2; log "missing libraries"; exit 1; fi
    for l in $(ldd "$bin" | awk '/=> \//{print $3} /^\t\/lib/{print $1}'); do
        mkdir -p "$PAY$(dirname "$l")"
        cp -L "$l" "$PAY$(dirname "$l")/"
    done
done
[ -e "$PAY/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$PAY/lib64/"
# The base initramfs has /usr/lib -> ../lib; libraries ldd names under /usr
# go to /lib (a directory entry in this archive would replace the link).
if [ -d "$PAY/usr/lib" ]; then cp -a "$PAY/usr/lib/." "$PAY/lib/"; rm -rf "$PAY/usr"; fi
(cd "$PAY" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc | gzip -1) >"$WORK/payload.cpio.gz"
cat "$GUEST/initrd.gz" "$WORK/payload.cpio.gz" >"$WORK/initrd.gz"
log "initramfs: base $(du -h "$GUEST/initrd.gz" | cut -f1) + payload $(du -h "$WORK/payload.cpio.gz" | cut -f1)"

# --- boot -------------------------------------------------------------------------
case "$ACCEL" in
tcg) accel=(-accel tcg -cpu max) ;;
kvm) accel=(-accel kvm -cpu host) ;;
auto) if [ -w /dev/kvm ]; then accel=(-accel kvm -accel tcg -cpu max); else accel=(-accel tcg -cpu max); fi ;;
*) log "bad --accel $ACCEL"; exit 2 ;;
esac
CONSOLE=$WORK/console.log
log "booting ($ACCEL, ${GUEST_MEM} MiB, bound ${RUN_TIMEOUT} s); console: $CONSOLE"
BOOT_T=$(date +%s.%N)
timeout --kill-after=10 "$RUN_TIMEOUT" qemu-system-x86_64 "${accel[@]}" -m "$GUEST_MEM" -smp 1 \
    -machine q35 -nodefaults -no-reboot -display none -monitor none \
    -serial "file:$CONSOLE" \
    -kernel "$GUEST/vmlinuz" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init" >"$WORK/qemu.out" 2>&1 &
QPID=$!
qrc=0
wait "$QPID" || qrc=$?
QPID=
GUEST_S=$(awk -v a="$BOOT_T" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
[ "$qrc" = 124 ] && log "the guest did not finish in ${RUN_TIMEOUT} s (killed)"
[ "$qrc" != 0 ] && [ "$qrc" != 124 ] && { log "qemu exit $qrc:"; cat "$WORK/qemu.out" >&2; }

# --- verdict -------------------------------------------------------------------
tr -d '\r' <"$CONSOLE" >"$WORK/console.txt"
grep -E '^HOSTSIDE-(BOOTED|WARN|GUEST-DONE)' "$WORK/console.txt" >&2 || true
grep '^HOSTSIDE-RESULT ' "$WORK/console.txt" >"$WORK/results" || true
if ! grep -q '^HOSTSIDE-GUEST-DONE' "$WORK/console.txt"; then
    log "no HOSTSIDE-GUEST-DONE: last console lines:"
    tail -30 "$WORK/console.txt" >&2
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
# A FAIL line for a step outside the list counts too.
extra=0
for s in $(awk '$3 == "FAIL" {print $2}' "$WORK/results"); do
    case " $(echo $EXPECTED) " in *" $s "*) ;; *) extra=$((extra + 1)) ;; esac
done
failed=$((failed + extra))
log "guest ran ${GUEST_S} s, whole run $(elapsed) s"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
