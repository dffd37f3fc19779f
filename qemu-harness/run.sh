#!/bin/bash
# Run the qemu harness: build (or reuse) the guest, then the scenarios.
# Exits non-zero on any verification error or scenario failure.
#
#   qemu-harness/run.sh [options]
#     --transport nbd|vhost-user-blk       how each qemu reaches the disk (env TRANSPORT, default nbd;
#                                          vhost-user-blk: a socket per qemu at its epoch, every
#                                          scenario (vhostproxy.py holds kicks); with --nbd-server
#                                          qemu-nbd and --expect-unfenced, qemu-storage-daemon serves
#                                          it unfenced: every scenario must then FAIL)
#     --nbd-server blkshim|qemu-nbd        NBD server under test (env NBD_SERVER, default blkshim;
#                                          qemu-nbd, with --expect-unfenced, shows the checks fail
#                                          without fencing)
#     --blkshim PATH                       blkshim binary (env BLKSHIM; default: cargo build, profile
#                                          env BLKSHIM_PROFILE=debug|release, default debug)
#     --scenarios LIST                     comma list of migrate,held-at-storage,cutoff,failover,
#                                          failback, and over vhost-user-blk reconnect (blkshim
#                                          restarted under load; env RESTARTS, RESTART_SIGNAL)
#                                          (default all)
#     --migrations N                       live migrations under load (env MIGRATIONS, default 4)
#     --interval S                         seconds of load between migrations (env MIG_INTERVAL, 5)
#     --rounds N                           minimum whole-disk fio rounds (env FIO_MIN_ROUNDS, 1)
#     --disk-mb N                          disk size in MiB (env DISK_MB, default 64)
#     --strict                             pause-before-switchover hand-off (env STRICT_SWITCHOVER=1)
#     --accel auto|kvm|tcg                 (env ACCEL, default auto: kvm probe, else tcg)
#     --expect-unfenced                    fault scenarios are expected to FAIL (qemu-nbd self-test
#                                          of the checks); the run fails if any of them passes
#     --timeout S                          bound on the whole run (env RUN_TIMEOUT, default 600)
#   held-at-storage: env HELD_DELAY (s a held write waits at the storage, default 10) and
#   HELD_FENCE_TIMEOUT (blkshim's --fence-timeout there, default 4; must be shorter)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

while [ $# -gt 0 ]; do
    case "$1" in
    --transport) export TRANSPORT=$2; shift ;;
    --nbd-server) export NBD_SERVER=$2; shift ;;
    --blkshim) export BLKSHIM=$2; shift ;;
    --scenarios) export SCENARIOS=$2; shift ;;
    --migrations) export MIGRATIONS=$2; shift ;;
    --interval) export MIG_INTERVAL=$2; shift ;;
    --rounds) export FIO_MIN_ROUNDS=$2; shift ;;
    --disk-mb) export DISK_MB=$2; shift ;;
    --strict) export STRICT_SWITCHOVER=1 ;;
    --accel) export ACCEL=$2; shift ;;
    --expect-unfenced) export EXPECT_FAULTS=fail ;;
    --timeout) export RUN_TIMEOUT=$2; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

# --- host packages ---------------------------------------------------------
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86 qemu-utils/bookworm)
have qemu-nbd || need+=(qemu-utils/bookworm)
have qemu-io || need+=(qemu-utils/bookworm)
have fio || need+=(fio)
have nbdinfo || need+=(libnbd-bin)
have nbdkit || need+=(nbdkit) # held-at-storage's unfenced control (pause filter)
have cpio || need+=(cpio)
have python3 || need+=(python3)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
    echo "run.sh: installing ${need[*]}" >&2
    # qemu-system-x86 from bookworm needs the matching qemu-utils (a newer
    # one may be preinstalled and conflicts), hence the downgrade.
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -q >&2 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --allow-downgrades \
        $(printf '%s\n' "${need[@]}" | sort -u) >&2
fi

# --- the NBD server --------------------------------------------------------
NBD_SERVER=${NBD_SERVER:-blkshim}
case "$NBD_SERVER" in blkshim|qemu-nbd) ;; *) echo "run.sh: bad --nbd-server $NBD_SERVER" >&2; exit 2 ;; esac
if [ "$NBD_SERVER" = blkshim ] && [ -z "${BLKSHIM:-}" ]; then
    # Debug profile by default: CI's `cargo test` has built most of it
    # already, and under TCG the guest, not the server, is the bottleneck.
    prof=${BLKSHIM_PROFILE:-debug}
    flag=; [ "$prof" = release ] && flag=--release
    echo "run.sh: building blkshim (cargo build $flag)" >&2
    (cd "$REPO" && cargo build $flag -q --bin blkshim) >&2
    export BLKSHIM=$REPO/target/$prof/blkshim
fi
if [ "$NBD_SERVER" = blkshim ] && ! "$BLKSHIM" serve --help >/dev/null 2>&1; then
    echo "run.sh: $BLKSHIM has no working 'serve' command" >&2
    exit 1
fi
export NBD_SERVER

# --- guest and run ---------------------------------------------------------
GUEST_DIR=$("$HERE/build-guest.sh" | tail -1)
export GUEST_DIR
echo "run.sh: guest $GUEST_DIR ($(cat "$GUEST_DIR/INFO"))" >&2
exec timeout --kill-after=10 "${RUN_TIMEOUT:-600}" python3 "$HERE/harness.py"
