#!/usr/bin/env bash
# The fio jobs of benches/nbd_fio.sh against blkshim's vhost-user-blk
# export, qemu-storage-daemon's vhost-user-blk export (both driven by our
# own frontend, examples/vhost_blk_load.rs, the same for both), and
# blkshim's NBD export (fio's nbd engine, as nbd_fio.sh runs it). Prints
# IOPS and MB/s per job and each column's ratio to blkshim-vhost.
#
#   benches/vhost_fio.sh [--cache=none|writeback|both] [--size=1G] [--runtime=10]
#                        [--repeat=1] [--dir=/var/tmp] [--jobs=REGEX]
#                        [--servers=LIST] [--base=PATH] [--raw]
#
# BLKSHIM=path runs that blkshim binary instead of this tree's release
# build. --base=PATH adds a column blkshim-base: the vhost-user-blk export
# of another blkshim binary (a baseline build), in the same interleaved
# rounds, so a change and its baseline are compared under the same load.
# --servers=LIST (comma-separated, of blkshim-vhost blkshim-base qsd-vhost
# blkshim-nbd fio-io_uring) picks the columns, the first being what ratios
# are to; fio-io_uring is no server but fio's own io_uring on the image
# (the same job, the same cache mode): the device's, or the page cache's,
# limit;
# --jobs=REGEX runs only the jobs whose name matches (grep -E). --raw also
# prints every round's IOPS of each cell (in round order), to compare
# columns round by round. A blkshim whose `serve` has no --vhost-user-blk
# (issue 13) gets no blkshim-vhost column: the script says so, and ratios
# are then to the first column left.
#
# With --repeat=N every server runs every job N times, the rounds
# interleaved (so drift hits all servers alike), and each cell is the
# median of its N runs. Within a round the servers of a job run back to
# back, in an order rotated each round, and the script ends with how
# many rounds the first column won against each other column.
#
# Like is compared with like: --cache=none runs blkshim with O_DIRECT
# against qemu-storage-daemon with cache.direct=on; --cache=writeback runs
# both through the page cache (cache.direct=off). qsd uses aio=io_uring.
# --jobs N of a job is N queues on one vhost-user connection, each driven
# by its own thread with the job's queue depth (fio's numjobs=N for NBD:
# N connections). The load generator's buffers are 4096-aligned.
# Needs: fio (with the nbd engine), qemu-storage-daemon, python3; installed
# with apt-get when missing.
set -euo pipefail

CACHE=both SIZE=1G RUNTIME=10 DIR=/var/tmp REPEAT=1 JOBRE= ONLY= BASEBIN= RAW=
for a in "$@"; do
  case $a in
    --cache=*) CACHE=${a#*=} ;;
    --size=*) SIZE=${a#*=} ;;
    --runtime=*) RUNTIME=${a#*=} ;;
    --dir=*) DIR=${a#*=} ;;
    --repeat=*) REPEAT=${a#*=} ;;
    --jobs=*) JOBRE=${a#*=} ;;
    --servers=*) ONLY=${a#*=} ;;
    --base=*) BASEBIN=${a#*=} ;;
    --raw) RAW=1 ;;
    -h|--help) sed -n 2,35p "$0"; exit 0 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/benches/common.sh"
bench_need fio qemu-storage-daemon python3
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
(cd "$ROOT" && cargo build --release --quiet --bin blkshim --example vhost_blk_load)
BLKSHIM=${BLKSHIM:-$TARGET/release/blkshim}
LOAD=$TARGET/release/examples/vhost_blk_load
WORK=$(mktemp -d "$DIR/blkshim-vhost-bench.XXXXXX")
IMG=$WORK/disk.img
SOCK=$WORK/nbd.sock
VSOCK=$WORK/vhost.sock
QUEUES=4 # the most --jobs of any job
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

SERVERS="blkshim-vhost qsd-vhost blkshim-nbd"
if [ -n "$BASEBIN" ]; then
  [ -x "$BASEBIN" ] || { echo "--base: $BASEBIN is not an executable" >&2; exit 2; }
  SERVERS="blkshim-vhost blkshim-base qsd-vhost blkshim-nbd"
fi
[ -n "$ONLY" ] && SERVERS=${ONLY//,/ }
for srv in $SERVERS; do
  case $srv in
    blkshim-vhost|qsd-vhost|blkshim-nbd|fio-io_uring) ;;
    blkshim-base) [ -n "$BASEBIN" ] || { echo "blkshim-base needs --base=PATH" >&2; exit 2; } ;;
    *) echo "unknown server $srv" >&2; exit 2 ;;
  esac
done
if ! "$BLKSHIM" serve --help 2>/dev/null | grep -q -- --vhost-user-blk; then
  echo "NOTE: $BLKSHIM has no 'serve --vhost-user-blk' (issue 13's export is not in this tree):" \
    "the blkshim-vhost column is skipped." >&2
  SERVERS=${SERVERS//blkshim-vhost/}
fi

# name | fio arguments (NBD) | load generator arguments (vhost-user-blk)
JOBS=(
  "randwrite-4k-qd32-j1|--rw=randwrite --bs=4k --iodepth=32 --numjobs=1|--rw randwrite --bs 4k --iodepth 32 --jobs 1"
  "randwrite-4k-qd32-j4|--rw=randwrite --bs=4k --iodepth=32 --numjobs=4|--rw randwrite --bs 4k --iodepth 32 --jobs 4"
  "randread-4k-qd32-j1|--rw=randread --bs=4k --iodepth=32 --numjobs=1|--rw randread --bs 4k --iodepth 32 --jobs 1"
  "randread-4k-qd32-j4|--rw=randread --bs=4k --iodepth=32 --numjobs=4|--rw randread --bs 4k --iodepth 32 --jobs 4"
  "seqwrite-1M-qd8-j1|--rw=write --bs=1M --iodepth=8 --numjobs=1|--rw write --bs 1M --iodepth 8 --jobs 1"
)
if [ -n "$JOBRE" ]; then
  KEEP=()
  for job in "${JOBS[@]}"; do
    if grep -qE -- "$JOBRE" <<<"${job%%|*}"; then KEEP+=("$job"); fi
  done
  [ ${#KEEP[@]} -gt 0 ] || { echo "--jobs=$JOBRE matches no job" >&2; exit 2; }
  JOBS=("${KEEP[@]}")
fi

bench_fill "$IMG" "$SIZE"

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
  rm -f "$SOCK" "$VSOCK"
}

start_server() { # name mode
  stop_server
  case $1 in
    blkshim-vhost|blkshim-base)
      local bin=$BLKSHIM; [ "$1" = blkshim-base ] && bin=$BASEBIN
      "$bin" serve --cache="$2" --socket="$SOCK" --control="$WORK/ctl.sock" \
        --state-dir="$WORK/epochs" --vhost-user-blk vm="$VSOCK" --vhost-queues $QUEUES \
        vm="$IMG" >/dev/null 2>"$WORK/$1.log" &
      SERVER_PID=$!
      bench_wait_socket "$VSOCK" "$WORK" ;;
    qsd-vhost)
      local d=off; [ "$2" = none ] && d=on
      qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$IMG,cache.direct=$d,aio=io_uring" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$VSOCK,writable=on,num-queues=$QUEUES" \
        >/dev/null 2>"$WORK/qsd.log" &
      SERVER_PID=$!
      bench_wait_socket "$VSOCK" "$WORK" ;;
    blkshim-nbd)
      # shellcheck disable=SC2046
      $(bench_nbd_server_cmd blkshim "$2" "$BLKSHIM" "$IMG" "$SOCK" "$WORK" "$SIZE") \
        >/dev/null 2>"$WORK/blkshim-nbd.log" &
      SERVER_PID=$!
      bench_wait_socket "$SOCK" "$WORK" ;;
    fio-io_uring) ;;
  esac
}

# run_job server fioargs loadargs -> "iops mbps" (or "fail fail")
run_job() {
  local srv=$1 fargs=$2 largs=$3 mode=$4 out
  if [ "$srv" = fio-io_uring ]; then
    local d=0; [ "$mode" = none ] && d=1
    # shellcheck disable=SC2086
    if out=$(fio --name=bench --size="$SIZE" --runtime="$RUNTIME" --time_based --group_reporting \
          --output-format=json --verify_state_save=0 --offset_increment=0 $fargs \
          --ioengine=io_uring --direct=$d --filename="$IMG" 2>"$WORK/fio.err"); then
      bench_fio_iops_mbps <<<"$out"
    else
      echo "WARNING: fio on the image failed: $(tail -3 "$WORK/fio.err")" >&2
      echo "fail fail"
    fi
  elif [ "$srv" = blkshim-nbd ]; then
    # shellcheck disable=SC2086
    if out=$(fio --name=bench --size="$SIZE" --runtime="$RUNTIME" --time_based --group_reporting \
          --output-format=json --verify_state_save=0 --offset_increment=0 $fargs \
          --ioengine=nbd --uri="nbd+unix:///vm?socket=$SOCK" 2>"$WORK/fio.err"); then
      bench_fio_iops_mbps <<<"$out"
    else
      echo "WARNING: fio against $srv failed: $(tail -3 "$WORK/fio.err")" >&2
      echo "fail fail"
    fi
  else
    # shellcheck disable=SC2086
    if out=$("$LOAD" --socket "$VSOCK" --runtime "$RUNTIME" --size "$SIZE" $largs 2>"$WORK/load.err"); then
      sed -n 's/.* iops=\([0-9]*\) mbps=\([0-9.]*\) .*/\1 \2/p' <<<"$out"
    else
      echo "WARNING: the load generator against $srv failed: $out $(tail -3 "$WORK/load.err")" >&2
      echo "fail fail"
    fi
  fi
}

MODES=$CACHE; [ "$CACHE" = both ] && MODES="none writeback"
declare -A RUNS
for round in $(seq "$REPEAT"); do
  for mode in $MODES; do
    for job in "${JOBS[@]}"; do
      IFS='|' read -r name fargs largs <<<"$job"
      # The servers of one job back to back, so drift between jobs hits
      # them alike, in an order rotated each round (bench_rotate).
      # shellcheck disable=SC2046
      for srv in $(bench_rotate "$round" $SERVERS); do
        # A fresh server for each job (every server alike): a vhost-user
        # backend serves one frontend per socket and need not take a
        # second one after the first left.
        start_server "$srv" "$mode"
        # Start each job with no dirty pages left by the one before, so
        # no server pays for another's write-back.
        sync
        # Through the page cache, every server starts with the whole
        # image cached, in small folios (bench_warm; O_DIRECT writes of
        # an earlier job drop pages).
        [ "$mode" = writeback ] && bench_warm "$IMG" "$SIZE"
        k="$mode|$srv|$name"
        RUNS[$k]="${RUNS[$k]:-}$(run_job "$srv" "$fargs" "$largs" "$mode");"
        if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
          echo "WARNING: $srv exited during $name (round $round, $mode):" >&2
          tail -5 "$WORK/$srv.log" >&2 2>/dev/null || true
          SERVER_PID=
        fi
        stop_server
      done
    done
  done
done
# The median run (by IOPS) of each cell; a failed run counts as the lowest.
declare -A R
for k in "${!RUNS[@]}"; do
  R[$k]=$(bench_median "${RUNS[$k]}")
done

set -- $SERVERS
BASE=$1
printf '\nvhost_blk_load (ours) and %s, %s file, %ss per job, median of %s, %s, %s\n' \
  "$(fio --version)" "$SIZE" "$RUNTIME" "$REPEAT" "$(qemu-storage-daemon --version | head -1)" "$(uname -r)"
printf '%-10s %-22s' mode job
for srv in $SERVERS; do printf ' %24s' "$srv IOPS MB/s (x)"; done
printf '\n'
for mode in $MODES; do
  for job in "${JOBS[@]}"; do
    j=${job%%|*}
    read -r biops _ <<<"${R[$mode|$BASE|$j]}"
    printf '%-10s %-22s' "$mode" "$j"
    for srv in $SERVERS; do
      read -r iops mb <<<"${R[$mode|$srv|$j]}"
      ratio=$(python3 -c "
b, p = '$biops', '$iops'
print('-' if 'fail' in (b, p) else '%.2f' % (float(p) / max(float(b), 1)))")
      printf ' %9s %7s (%5s)' "$iops" "$mb" "$ratio"
    done
    printf '\n'
  done
done
printf '(x) = column / %s; above 1.00 that column is faster.\n' "$BASE"
if [ -n "$RAW" ]; then
  names=(); for job in "${JOBS[@]}"; do names+=("${job%%|*}"); done
  bench_print_rounds RUNS "$MODES" "$SERVERS" "${names[@]}"
fi
if [ "$REPEAT" -gt 1 ]; then
  names=(); for job in "${JOBS[@]}"; do names+=("${job%%|*}"); done
  bench_print_wins RUNS "$MODES" "$SERVERS" "${names[@]}"
fi
