#!/usr/bin/env bash
# Where a vhost-user-blk server's time goes on one load: per request, the
# server's CPU time, context switches and system calls by kind (perf stat
# on tracepoints over the server's whole life, every thread), driven by
# the same load generator as benches/vhost_fio.sh, and optionally the
# hottest symbols (perf record). With --cache=writeback the image is read
# into the page cache first.
#
#   benches/vhost_profile.sh [--server=blkshim|qemu-storage-daemon]
#                            [--rw=randread|randwrite|write|read] [--bs=4k] [--iodepth=32]
#                            [--jobs=1] [--cache=none|writeback] [--size=1G] [--runtime=10]
#                            [--dir=/var/tmp] [--record]
#
# Needs perf (linux-perf) and qemu-storage-daemon. Root (tracepoints).
set -euo pipefail

SERVER=blkshim RW=randread BS=4k QD=32 JOBS=1 CACHE=writeback SIZE=1G RUNTIME=10 DIR=/var/tmp RECORD=0
for a in "$@"; do
  case $a in
    --server=*) SERVER=${a#*=} ;;
    --rw=*) RW=${a#*=} ;;
    --bs=*) BS=${a#*=} ;;
    --iodepth=*) QD=${a#*=} ;;
    --jobs=*) JOBS=${a#*=} ;;
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
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
(cd "$ROOT" && cargo build --release --quiet --bin blkshim --example vhost_blk_load)
LOAD=$TARGET/release/examples/vhost_blk_load
WORK=$(mktemp -d "$DIR/blkshim-vprof.XXXXXX")
IMG=$WORK/disk.img VSOCK=$WORK/vhost.sock
PERF_PID=
cleanup() {
  [ -n "$PERF_PID" ] && kill -INT "$(pgrep -P "$PERF_PID" | head -1)" 2>/dev/null && wait "$PERF_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

bench_fill "$IMG" "$SIZE"
# Through the page cache, profile the server, not the device: the image is
# filled with O_DIRECT, so read it into the cache first.
[ "$CACHE" = writeback ] && cat "$IMG" >/dev/null

EVENTS=task-clock,context-switches,raw_syscalls:sys_enter
for s in io_uring_enter preadv2 pwritev2 read write epoll_wait futex recvmsg sendmsg; do
  EVENTS=$EVENTS,syscalls:sys_enter_$s
done

case $SERVER in
  blkshim)
    SERVER_CMD=("$TARGET/release/blkshim" serve --cache="$CACHE" --socket="$WORK/nbd.sock"
      --control="$WORK/ctl.sock" --state-dir="$WORK/epochs" --vhost-user-blk vm="$VSOCK"
      --vhost-queues 4 vm="$IMG") ;;
  qemu-storage-daemon)
    d=off; [ "$CACHE" = none ] && d=on
    SERVER_CMD=(qemu-storage-daemon
      --blockdev "driver=file,node-name=f,filename=$IMG,cache.direct=$d,aio=io_uring"
      --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$VSOCK,writable=on,num-queues=4") ;;
  *) echo "unknown server $SERVER" >&2; exit 2 ;;
esac
perf stat -x, -o "$WORK/perf.csv" -e "$EVENTS" -- "${SERVER_CMD[@]}" >/dev/null 2>"$WORK/server.log" &
PERF_PID=$!
bench_wait_socket "$VSOCK" "$WORK"
if [ "$RECORD" = 1 ]; then
  spid=$(pgrep -P "$PERF_PID" | head -1)
  perf record -F 999 -o "$WORK/perf.data" -p "$spid" -- sleep "$RUNTIME" >/dev/null 2>&1 &
fi
"$LOAD" --socket "$VSOCK" --runtime "$RUNTIME" --size "$SIZE" --rw "$RW" --bs "$BS" \
  --iodepth "$QD" --jobs "$JOBS" >"$WORK/load.out"
kill -INT "$(pgrep -P "$PERF_PID" | head -1)" 2>/dev/null || true
wait "$PERF_PID" 2>/dev/null || true
PERF_PID=
wait

out=$(cat "$WORK/load.out")
ios=$(sed -n 's/.* ios=\([0-9]*\) .*/\1/p' <<<"$out")
iops=$(sed -n 's/.* iops=\([0-9]*\) .*/\1/p' <<<"$out")
echo "$SERVER: $RW $BS QD$QD j$JOBS cache=$CACHE: $iops IOPS, $ios requests"
bench_perf_per_request "$WORK/perf.csv" "$ios" server
if [ "$RECORD" = 1 ] && [ -f "$WORK/perf.data" ]; then
  perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -25
fi
