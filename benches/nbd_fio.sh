#!/usr/bin/env bash
# The same fio jobs against blkshim serve and its peers, qemu-nbd
# --aio=io_uring, nbdkit's file plugin and qemu-storage-daemon's NBD export
# (aio=io_uring), beside two limits: fio's own io_uring on the raw file
# (the device) and nbdkit's memory plugin (the client and the socket, no
# device). Prints IOPS and MB/s per job, each column's ratio to blkshim,
# the cell's limit (the lower of the two), blkshim / limit and blkshim /
# the best peer.
#
#   benches/nbd_fio.sh [--cache=none|writeback|both] [--size=1G] [--runtime=10]
#                      [--repeat=1] [--dir=/var/tmp] [--tls] [--jobs=REGEX]
#                      [--servers="blkshim qemu-nbd ..."] [--base=PATH] [--raw]
#                      [--spin-idle]
#
# --jobs runs only the jobs whose name matches (e.g. --jobs='4k'); --servers
# only the named columns (blkshim is always run). --base=PATH adds a column
# blkshim-base: another blkshim binary (a baseline build) in the same
# interleaved rounds, so a change and its baseline meet the same load.
# --raw also prints every round's IOPS of each cell, in round order.
# --spin-idle runs a busy loop at SCHED_IDLE on every CPU for the whole
# run: a diagnostic, not a setting. A CPU then never halts, so a wakeup
# no longer waits for a halted vCPU to be scheduled again by the host
# (costly in a nested VM); every column is measured that way, the limits
# too.
#
# --tls adds the same servers over TLS (X.509, client certificates checked
# against the CA, made here with openssl): blkshim-tls (--tls require and a
# [[client]] grant), qemu-nbd-tls (--tls-creds, verify-peer=on) and
# nbdkit-tls (--tls=require --tls-verify-peer); fio connects with
# nbds+unix://, libnbd taking the client certificate from /etc/pki/libnbd
# in a private mount namespace (fio's engine refuses tls-certificates= in
# the URI; root, for unshare -m).
#
# With --repeat=N every server runs every job N times, the rounds
# interleaved (so drift hits all servers alike), and each cell is the
# median of its N runs. The servers' order is rotated each round, and the
# script ends with how many rounds the first column won against each other
# column.
#
# Like is compared with like: --cache=none runs blkshim with O_DIRECT
# against qemu-nbd --cache=none and fio --direct=1 (nbdkit's closest is
# cache=none, which only drops pages with fadvise); --cache=writeback runs
# every server through the page cache.
# Needs: fio, qemu-nbd, nbdkit, python3; installed with apt-get when missing.
set -euo pipefail

CACHE=both SIZE=1G RUNTIME=10 DIR=/var/tmp REPEAT=1 TLS=0 JOBRE=. ONLY= BASEBIN= RAW=0 SPIN=0
for a in "$@"; do
  case $a in
    --cache=*) CACHE=${a#*=} ;;
    --size=*) SIZE=${a#*=} ;;
    --runtime=*) RUNTIME=${a#*=} ;;
    --dir=*) DIR=${a#*=} ;;
    --repeat=*) REPEAT=${a#*=} ;;
    --tls) TLS=1 ;;
    --jobs=*) JOBRE=${a#*=} ;;
    --servers=*) ONLY=${a#*=} ;;
    --base=*) BASEBIN=${a#*=} ;;
    --raw) RAW=1 ;;
    --spin-idle) SPIN=1 ;;
    -h|--help) sed -n 2,37p "$0"; exit 0 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/benches/common.sh"
bench_need fio qemu-nbd nbdkit qemu-storage-daemon python3
(cd "$ROOT" && cargo build --release --quiet)
BLKSHIM=$ROOT/target/release/blkshim
WORK=$(mktemp -d "$DIR/blkshim-bench.XXXXXX")
IMG=$WORK/disk.img
SOCK=$WORK/nbd.sock
SERVER_PID=
SPINNERS=()
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  [ ${#SPINNERS[@]} -gt 0 ] && kill "${SPINNERS[@]}" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ "$SPIN" = 1 ]; then
  for c in $(seq 0 $(($(nproc) - 1))); do
    taskset -c "$c" chrt -i 0 sh -c 'while :; do :; done' &
    SPINNERS+=($!)
  done
  echo "spinning at SCHED_IDLE on $(nproc) CPUs (--spin-idle)" >&2
fi

if [ "$TLS" = 1 ]; then
  bench_need openssl
  PKI=$WORK/pki
  mkdir -p "$PKI/server" "$PKI/client"
  ( cd "$PKI"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem \
      -out ca-cert.pem -days 2 -subj "/O=blkshim-bench/CN=bench CA" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    for kind in server client; do
      cp ca-cert.pem "$kind/"
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$kind/$kind-key.pem" \
        -out "$kind.csr" -subj "/O=blkshim-bench/CN=$kind"
      if [ $kind = server ]; then
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' >ext
      else
        printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' >ext
      fi
      openssl x509 -req -in "$kind.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
        -out "$kind/$kind-cert.pem" -days 2 -extfile ext
    done ) >/dev/null 2>&1
  printf '[[client]]\nidentity = "CN=client,O=blkshim-bench"\ndisks = ["*"]\naccess = "rw"\n' >"$WORK/authz.toml"
fi

bench_fill "$IMG" "$SIZE"

JOBS=(
  "randwrite-4k-qd32-j1|--rw=randwrite --bs=4k --iodepth=32 --numjobs=1"
  "randwrite-4k-qd32-j4|--rw=randwrite --bs=4k --iodepth=32 --numjobs=4"
  "randread-4k-qd32-j1|--rw=randread --bs=4k --iodepth=32 --numjobs=1"
  "randread-4k-qd32-j4|--rw=randread --bs=4k --iodepth=32 --numjobs=4"
  "seqwrite-1M-qd8-j1|--rw=write --bs=1M --iodepth=8 --numjobs=1"
)

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
  rm -f "$SOCK"
}

start_server() { # name mode
  stop_server
  case $1 in
    blkshim|qemu-nbd|nbdkit|qemu-storage-daemon|nbdkit-memory)
      # shellcheck disable=SC2046
      $(bench_nbd_server_cmd "$1" "$2" "$BLKSHIM" "$IMG" "$SOCK" "$WORK" "$SIZE") \
        >/dev/null 2>"$WORK/$1.log" &
      SERVER_PID=$! ;;
    blkshim-base)
      # shellcheck disable=SC2046
      $(bench_nbd_server_cmd blkshim "$2" "$BASEBIN" "$IMG" "$SOCK" "$WORK" "$SIZE") \
        >/dev/null 2>"$WORK/$1.log" &
      SERVER_PID=$! ;;
    blkshim-tls)
      "$BLKSHIM" serve --cache="$2" --socket="$SOCK" --control="$WORK/ctl.sock" \
        --state-dir="$WORK/epochs" --tls require --tls-certificates "$PKI/server" \
        --config "$WORK/authz.toml" vm="$IMG" >/dev/null 2>"$WORK/blkshim-tls.log" &
      SERVER_PID=$! ;;
    qemu-nbd-tls)
      local c=writeback; [ "$2" = none ] && c=none
      qemu-nbd --aio=io_uring --cache=$c -f raw -x vm --shared=16 --persistent \
        --object "tls-creds-x509,id=tls0,dir=$PKI/server,endpoint=server,verify-peer=on" \
        --tls-creds tls0 --socket="$SOCK" "$IMG" 2>"$WORK/qemu-nbd-tls.log" &
      SERVER_PID=$! ;;
    nbdkit-tls)
      local c=default; [ "$2" = none ] && c=none
      nbdkit --foreground --exit-with-parent -U "$SOCK" -e vm --tls=require \
        --tls-certificates="$PKI/server" --tls-verify-peer file "$IMG" cache=$c \
        2>"$WORK/nbdkit-tls.log" &
      SERVER_PID=$! ;;
  esac
  bench_wait_socket "$SOCK" "$WORK"
}

uri_of() { # server -> the URI fio's nbd engine connects to
  case $1 in
    *-tls) echo "nbds+unix:///vm?socket=$SOCK" ;;
    *) echo "nbd+unix:///vm?socket=$SOCK" ;;
  esac
}

# run_fio name mode jobargs -> "iops mbps"
run_fio() {
  local name=$1 mode=$2 args=$3 common
  common="--name=bench --size=$SIZE --runtime=$RUNTIME --time_based --group_reporting \
          --output-format=json --verify_state_save=0 --offset_increment=0"
  if [ "$name" = fio-io_uring ]; then
    local d=0; [ "$mode" = none ] && d=1
    # shellcheck disable=SC2086
    fio $common $args --ioengine=io_uring --direct=$d --filename="$IMG"
  else
    # shellcheck disable=SC2086
    case $name in
    *-tls)
      # fio's engine may not name local files in the URI, and libnbd run
      # by root reads its client certificate from /etc/pki/libnbd: give
      # fio a private /etc/pki (a mount namespace; the host's is untouched).
      # shellcheck disable=SC2016,SC2086
      unshare -m sh -c 'mkdir -p /etc/pki && mount -t tmpfs tmpfs /etc/pki && mkdir /etc/pki/libnbd &&
        cp "$0"/* /etc/pki/libnbd/ && exec "$@"' "$PKI/client" \
        fio $common $args --ioengine=nbd --uri="$(uri_of "$name")" ;;
    *)
      # shellcheck disable=SC2086
      fio $common $args --ioengine=nbd --uri="$(uri_of "$name")" ;;
    esac
  fi | bench_fio_iops_mbps
}

MODES=$CACHE; [ "$CACHE" = both ] && MODES="none writeback"
PEERS="qemu-nbd nbdkit qemu-storage-daemon"
LIMITS="fio-io_uring nbdkit-memory"
[ "$TLS" = 1 ] && PEERS="$PEERS blkshim-tls qemu-nbd-tls nbdkit-tls"
if [ -n "$ONLY" ]; then
  keep() { local out=; for s in $1; do [[ " $ONLY " == *" $s "* ]] && out="$out $s"; done; echo $out; }
  PEERS=$(keep "$PEERS") LIMITS=$(keep "$LIMITS")
fi
BASECOL=
if [ -n "$BASEBIN" ]; then
  [ -x "$BASEBIN" ] || { echo "--base: $BASEBIN is not an executable" >&2; exit 2; }
  BASECOL=blkshim-base
fi
SERVERS="blkshim $BASECOL $PEERS $LIMITS"
sel=()
for job in "${JOBS[@]}"; do [[ ${job%%|*} =~ $JOBRE ]] && sel+=("$job"); done
JOBS=("${sel[@]}")
declare -A RUNS
for round in $(seq "$REPEAT"); do
  for mode in $MODES; do
    # shellcheck disable=SC2046
    for srv in $(bench_rotate "$round" $SERVERS); do
      [ "$srv" != fio-io_uring ] && start_server "$srv" "$mode"
      for job in "${JOBS[@]}"; do
        # Start each job with no dirty pages left by the one before, so
        # no server pays for another's write-back.
        sync
        # Through the page cache, every server starts with the whole
        # image cached, in small folios (bench_warm; O_DIRECT writes of
        # an earlier job drop pages).
        [ "$mode" = writeback ] && bench_warm "$IMG" "$SIZE"
        k="$mode|$srv|${job%%|*}"
        RUNS[$k]="${RUNS[$k]:-}$(run_fio "$srv" "$mode" "${job#*|}");"
      done
      stop_server
    done
  done
done
# The median run (by IOPS) of each cell.
declare -A R
for k in "${!RUNS[@]}"; do
  R[$k]=$(bench_median "${RUNS[$k]}")
done

printf '\nfio %s, %s file, %ss per job, median of %s, %s\n' "$(fio --version)" "$SIZE" "$RUNTIME" "$REPEAT" "$(uname -r)"
printf '%-10s %-22s' mode job
for srv in $SERVERS; do printf ' %24s' "$srv IOPS MB/s (x)"; done
printf ' %8s %9s %9s\n' limit b/limit b/peer
for mode in $MODES; do
  for job in "${JOBS[@]}"; do
    j=${job%%|*}
    read -r biops _ <<<"${R[$mode|blkshim|$j]}"
    printf '%-10s %-22s' "$mode" "$j"
    best=0 limit=
    for srv in $SERVERS; do
      read -r iops mb <<<"${R[$mode|$srv|$j]}"
      ratio=$(python3 -c "print('%.2f' % ($iops / max($biops, 1)))")
      printf ' %9s %7s (%5s)' "$iops" "$mb" "$ratio"
      case " $PEERS " in *" $srv "*) [ "$iops" -gt "$best" ] && best=$iops ;; esac
      case " $LIMITS " in *" $srv "*) { [ -z "$limit" ] || [ "$iops" -lt "$limit" ]; } && limit=$iops ;; esac
    done
    python3 -c "
import sys
b, lim, best = float(sys.argv[1]), sys.argv[2], float(sys.argv[3])
print(' %8s %9s %9s' % (lim or '-', '%.2f' % (b / float(lim)) if lim else '-',
                         '%.2f' % (b / best) if best else '-'))" "$biops" "$limit" "$best"
  done
done
printf '(x) = column / blkshim; above 1.00 that column is faster. limit = the lower of\n'
printf '%s; b/limit = blkshim / limit; b/peer = blkshim / the best of %s.\n' "$LIMITS" "$PEERS"
if [ "$RAW" = 1 ]; then
  names=(); for job in "${JOBS[@]}"; do names+=("${job%%|*}"); done
  bench_print_rounds RUNS "$MODES" "$SERVERS" "${names[@]}"
fi
if [ "$REPEAT" -gt 1 ]; then
  names=(); for job in "${JOBS[@]}"; do names+=("${job%%|*}"); done
  bench_print_wins RUNS "$MODES" "$SERVERS" "${names[@]}"
fi
