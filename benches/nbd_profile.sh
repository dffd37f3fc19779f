#!/usr/bin/env bash
# Where an NBD server's time goes on one fio job: per request, the
# server's CPU time, context switches and system calls by kind (perf stat
# on tracepoints over the server's whole life, every thread), the queue
# depth actually held at the device (/sys/block/DEV/inflight sampled every
# 5 ms during the job), and optionally the hottest symbols (perf record).
#
#   benches/nbd_profile.sh [--server=blkshim|qemu-storage-daemon|qemu-nbd|nbdkit|nbdkit-memory|raw]
#                          [--rw=randread|randwrite] [--bs=4k] [--iodepth=32] [--numjobs=1]
#                          [--cache=none|writeback] [--size=1G] [--runtime=10] [--dir=/var/tmp]
#                          [--record]
#
# "raw" is fio's own io_uring on the image file (no server): its device
# queue depth is what the device can be given. Needs perf (linux-perf),
# fio, and the peers' packages. Root (tracepoints).
set -euo pipefail

SERVER=blkshim RW=randread BS=4k QD=32 NJ=1 CACHE=none SIZE=1G RUNTIME=10 DIR=/var/tmp RECORD=0
for a in "$@"; do
  case $a in
    --server=*) SERVER=${a#*=} ;;
    --rw=*) RW=${a#*=} ;;
    --bs=*) BS=${a#*=} ;;
    --iodepth=*) QD=${a#*=} ;;
    --numjobs=*) NJ=${a#*=} ;;
    --cache=*) CACHE=${a#*=} ;;
    --size=*) SIZE=${a#*=} ;;
    --runtime=*) RUNTIME=${a#*=} ;;
    --dir=*) DIR=${a#*=} ;;
    --record) RECORD=1 ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/benches/common.sh"
bench_need perf fio
[ "$SERVER" = blkshim ] && (cd "$ROOT" && cargo build --release --quiet)
BLKSHIM=$ROOT/target/release/blkshim
WORK=$(mktemp -d "$DIR/blkshim-prof.XXXXXX")
IMG=$WORK/disk.img SOCK=$WORK/nbd.sock
PERF_PID=
cleanup() {
  [ -n "$PERF_PID" ] && kill -INT "$PERF_PID" 2>/dev/null && wait "$PERF_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

bench_fill "$IMG" "$SIZE"
# The block device under the image (a partition's parent has no inflight
# of its own to read, so take the device the file system names).
src=$(findmnt -n -o SOURCE -T "$IMG")
DEV=$(basename "$(readlink -f "$src")")
[ -r "/sys/class/block/$DEV/inflight" ] || { echo "no inflight counters for $DEV" >&2; exit 1; }

EVENTS=task-clock,context-switches,raw_syscalls:sys_enter
for s in io_uring_enter sendmsg sendto recvfrom recvmsg read write readv writev pread64 pwrite64 \
         preadv pwritev epoll_wait ppoll poll futex; do
  EVENTS=$EVENTS,syscalls:sys_enter_$s
done

direct=0; [ "$CACHE" = none ] && direct=1
FIOARGS="--name=prof --size=$SIZE --runtime=$RUNTIME --time_based --group_reporting --rw=$RW
         --bs=$BS --iodepth=$QD --numjobs=$NJ --output-format=json"
if [ "$SERVER" = raw ]; then
  # shellcheck disable=SC2086
  perf stat -x, -o "$WORK/perf.csv" -e "$EVENTS" -- \
    fio $FIOARGS --ioengine=io_uring --direct=$direct --filename="$IMG" >"$WORK/fio.json" &
  FIO_PID=$!
else
  # shellcheck disable=SC2046
  perf stat -x, -o "$WORK/perf.csv" -e "$EVENTS" -- \
    $(bench_nbd_server_cmd "$SERVER" "$CACHE" "$BLKSHIM" "$IMG" "$SOCK" "$WORK" "$SIZE") \
    >/dev/null 2>"$WORK/server.log" &
  PERF_PID=$!
  for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
  [ -S "$SOCK" ] || { echo "server did not start" >&2; cat "$WORK/server.log" >&2; exit 1; }
  if [ "$RECORD" = 1 ]; then
    spid=$(pgrep -P "$PERF_PID" | head -1)
    perf record -F 499 -g -o "$WORK/perf.data" -p "$spid" -- sleep "$RUNTIME" >/dev/null 2>&1 &
  fi
  # shellcheck disable=SC2086
  fio $FIOARGS --ioengine=nbd --uri="nbd+unix:///vm?socket=$SOCK" >"$WORK/fio.json" 2>/dev/null &
  FIO_PID=$!
fi
# The device's queue depth while the job runs (skip the first second).
sleep 1
end=$(( $(date +%s) + RUNTIME - 2 ))
while [ "$(date +%s)" -lt "$end" ]; do
  cat "/sys/class/block/$DEV/inflight"
  sleep 0.005
done >"$WORK/inflight.txt"
wait "$FIO_PID"
if [ -n "$PERF_PID" ]; then
  kill -INT "$(pgrep -P "$PERF_PID" | head -1)" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=
fi
wait

report=$(python3 - "$WORK" "$SERVER" "$RW" "$BS" "$QD" "$NJ" "$CACHE" "$DEV" <<'EOF'
import json, sys, statistics
work, server, rw, bs, qd, nj, cache, dev = sys.argv[1:]
t = open(f"{work}/fio.json").read()
j = json.loads(t[t.index("{"):])["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
iops = j["read"]["iops"] + j["write"]["iops"]
inf = [sum(map(int, l.split())) for l in open(f"{work}/inflight.txt") if l.strip()]
# The report's head, then the request count on a line of its own.
print(f"{server}: {rw} {bs} QD{qd} j{nj} cache={cache}: {iops:.0f} IOPS, {ios} requests")
print(f"  device {dev} in flight: mean {statistics.mean(inf):.1f}, median {statistics.median(inf):.0f}, "
      f"max {max(inf)} ({len(inf)} samples)")
print(ios)
EOF
)
ios=${report##*$'\n'}
printf '%s\n' "${report%$'\n'*}"
who=$SERVER; [ "$SERVER" = raw ] && who=fio+io_uring
bench_perf_per_request "$WORK/perf.csv" "$ios" "$who"
if [ "$RECORD" = 1 ] && [ -f "$WORK/perf.data" ]; then
  perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -25
fi
