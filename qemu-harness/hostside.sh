#!/bin/bash
# Host-side fencing on a real SCSI target: boot a qemu guest whose LIO
# exports one fileio backstore through two tcm_loop targets (/dev/sda and
# /dev/sdb: two I_T nexuses onto one LU) and run seeds/002's SCSI-3
# persistent-reservation validation through blkshim's PrFencing
# (tests/pr_lio.rs) and the `blkshim pr` command line in it; then two
# blkshim instances in host-side mode (`serve --fence F`), A on /dev/sda and
# B on /dev/sdb behind dm-delay devices, sharing one state directory, under
# the stamped workload examples/hostside_load.rs: migrate-drain, cut-off,
# failover, failback (hostside-scenarios.sh).
#
#   qemu-harness/hostside.sh [--fence pr|none|gateway] [--expect-unfenced]
#                            [--scenarios LIST] [--accel tcg|kvm|auto] [--timeout S] [--keep]
#
# --fence pr (default): every step must PASS. --fence none: the scenarios
# with `--fence none` (the operator confirms each takeover with `blkshim ctl
# takeover shared --source-dead`); with --expect-unfenced the run passes only
# when migrate-drain PASSes, B's unconfirmed takeover is refused, and each
# fault scenario (cut-off, failover, failback) FAILs with verdict=stale (a
# setup error or an unarmed race never counts). --fence gateway: the
# harness's own negative control, the scenarios against plain gateway
# `blkshim serve` (no host-side mode); use it with --expect-unfenced.
# --scenarios: a comma list out of migrate-drain,cut-off,failover,failback.
#
# Prints the guest's `HOSTSIDE-RESULT <step> PASS|FAIL <evidence>` lines and
# `N passed, M failed`; exits 0 only when every expected step passed. The
# guest (kernel, busybox, LIO modules from Debian packages) is built once by
# hostside-build.sh and cached in qemu-harness/.cache/; blkshim
# (`cargo build`, HOSTSIDE_PROFILE=release for an optimised one), the pr_lio test binary
# (`cargo test --no-run --test pr_lio`), the workload (`cargo build --example
# hostside_load`) and the host's dmsetup are built/taken on the host and
# appended to the initramfs with their ldd libraries at every run.
#
# env: ACCEL (default tcg), RUN_TIMEOUT (guest run bound, default 480 s),
# GUEST_MEM (default 1024 MiB), GUEST_RUST_LOG (default warn), KEEP=1 keeps
# the work directory; for the scenarios (passed to the guest): HS_BLOCKS
# (64), CUT_DELAY_MS (8000: how long dm-delay holds the cut-off host's
# writes), DRAIN_DELAY_MS (2000), HS_FENCE_TIMEOUT (5s), HS_RUST_LOG (info).
# Under TCG: pr ~80 s, none ~110 s (boot, seeds/002 and the scenarios).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ACCEL=${ACCEL:-tcg}
RUN_TIMEOUT=${RUN_TIMEOUT:-480}
FENCE=pr
EXPECT_UNFENCED=0
SCENARIOS="migrate-drain cut-off failover failback"
GUEST_MEM=${GUEST_MEM:-1024}
KEEP=${KEEP:-0}

while [ $# -gt 0 ]; do
    case "$1" in
    --accel) ACCEL=$2; shift ;;
    --timeout) RUN_TIMEOUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --fence) FENCE=$2; shift ;;
    --expect-unfenced) EXPECT_UNFENCED=1 ;;
    --scenarios) SCENARIOS=$(echo "$2" | tr ',' ' '); shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "hostside.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "hostside: $*" >&2; }
case "$FENCE" in pr|none|gateway) ;; *) log "bad --fence $FENCE"; exit 2 ;; esac
if [ "$EXPECT_UNFENCED" = 1 ] && [ "$FENCE" = pr ]; then log "--expect-unfenced wants --fence none or gateway"; exit 2; fi
for s in $SCENARIOS; do
    case "$s" in migrate-drain|cut-off|failover|failback) ;; *) log "unknown scenario $s"; exit 2 ;; esac
done
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# The steps that must each print PASS (a missing one counts as failed).
EXPECTED="lio-setup transport baseline-io register-a reserve-a read-pr unregistered-preempt-refused
register-b reserve-b-refused nonholder-write-ebade holder-write unregister-b defend preempt-newer
old-holder-write-ebade data-check old-holder-reregister-refused release clear access-restored
foreign-key-untouched foreign-reservation cleanup pr_lio-binary cli-takeover cli-keys
cli-stale-takeover-refused cli-preempt-newer cli-dd-fenced-write cli-stale-register-conflict
cli-reservation cli-clear cli-cleared hs-plumbing hs-dm-ebade"
# The two-instance scenarios: STEP=WANT, WANT being PASS or stale (a FAIL
# whose verdict is stale: the unfenced run must really land stale blocks).
HS_EXPECT=
for s in $SCENARIOS; do
    want=PASS
    if [ "$EXPECT_UNFENCED" = 1 ] && [ "$s" != migrate-drain ]; then want=stale; fi
    HS_EXPECT="$HS_EXPECT hs-$s-$FENCE=$want"
done
case " $SCENARIOS " in *" cut-off "*) [ "$FENCE" = none ] && HS_EXPECT="$HS_EXPECT hs-refused-none=PASS" ;; esac

# --- host tools --------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v python3 >/dev/null || need+=(python3)
command -v strip >/dev/null || need+=(binutils)
command -v dmsetup >/dev/null || need+=(dmsetup)
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
log "cargo build $PROFILE_FLAG --example hostside_load"
(cd "$REPO" && cargo build $PROFILE_FLAG -q --example hostside_load) >&2
LOAD_BIN=$REPO/target/${HOSTSIDE_PROFILE:-debug}/examples/hostside_load
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
strip -o "$PAY/payload/hostside_load" "$LOAD_BIN"
mkdir -p "$PAY/sbin"
cp -L "$(command -v dmsetup)" "$PAY/sbin/dmsetup"
cp "$HERE/hostside-guest.sh" "$PAY/payload/run.sh"
cp "$HERE/hostside-scenarios.sh" "$PAY/payload/scenarios.sh"
chmod 755 "$PAY/payload/"*
printf 'HS_FENCE=%s\nHS_SCENARIOS="%s"\n' "$FENCE" "$SCENARIOS" >"$PAY/payload/hostside.conf"
for v in HS_BLOCKS DRAIN_DELAY_MS CUT_DELAY_MS HS_FENCE_TIMEOUT HS_RUST_LOG; do
    if [ -n "${!v:-}" ]; then printf '%s=%q\n' "$v" "${!v}" >>"$PAY/payload/hostside.conf"; fi
done
for bin in "$PAY/payload/blkshim" "$PAY/payload/pr_lio" "$PAY/payload/hostside_load" "$PAY/sbin/dmsetup"; do
    if ldd "$bin" | awk '/not found/{n++} END{exit !n}'; then ldd "$bin" >&2; log "missing libraries"; exit 1; fi
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
grep -E '^HOSTSIDE-(BOOTED|WARN|LOG|GUEST-DONE)' "$WORK/console.txt" >&2 || true
grep '^HOSTSIDE-RESULT ' "$WORK/console.txt" >"$WORK/results" || true
if ! grep -q '^HOSTSIDE-GUEST-DONE' "$WORK/console.txt"; then
    log "no HOSTSIDE-GUEST-DONE: last console lines:"
    tail -30 "$WORK/console.txt" >&2
fi
cat "$WORK/results"
grep '^HOSTSIDE-SUMMARY ' "$WORK/console.txt" || true
passed=0 failed=0
for step in $EXPECTED; do
    line=$(grep -m1 "^HOSTSIDE-RESULT $step " "$WORK/results" || true)
    case "$line" in
    "HOSTSIDE-RESULT $step PASS"*) passed=$((passed + 1)) ;;
    "") echo "HOSTSIDE-RESULT $step FAIL missing (the guest never reported it)"; failed=$((failed + 1)) ;;
    *) failed=$((failed + 1)) ;;
    esac
done
# The scenarios: PASS, or (expected unfenced) a FAIL with verdict=stale.
hs_steps=
for pair in $HS_EXPECT; do
    step=${pair%=*} want=${pair#*=}
    hs_steps="$hs_steps $step"
    line=$(grep -m1 "^HOSTSIDE-RESULT $step " "$WORK/results" || true)
    case "$want:$line" in
    "PASS:HOSTSIDE-RESULT $step PASS"*) passed=$((passed + 1)) ;;
    "stale:HOSTSIDE-RESULT $step FAIL verdict=stale"*)
        echo "HOSTSIDE-EXPECTED $step: stale blocks, as expected without a fence"; passed=$((passed + 1)) ;;
    *:) echo "HOSTSIDE-RESULT $step FAIL missing (the guest never reported it)"; failed=$((failed + 1)) ;;
    stale:*) echo "HOSTSIDE-UNEXPECTED $step: wanted verdict=stale (an unfenced run must land stale blocks), got: $(echo "$line" | cut -d' ' -f3-4)"; failed=$((failed + 1)) ;;
    *) failed=$((failed + 1)) ;;
    esac
done
# A FAIL line for a step outside the lists counts too.
extra=0
for s in $(awk '$3 == "FAIL" {print $2}' "$WORK/results"); do
    case " $(echo $EXPECTED $hs_steps) " in *" $s "*) ;; *) extra=$((extra + 1)) ;; esac
done
failed=$((failed + extra))
log "guest ran ${GUEST_S} s, whole run $(elapsed) s"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
