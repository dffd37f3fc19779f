# Sourced by the bench scripts: one place
# for how a bench image is filled, how each NBD server is started, how fio's
# JSON becomes "IOPS MB/s" and how rounds become a median, so the scripts
# measure the same servers the same way.

# Install the tools a bench runs when they are missing (root, apt-get), as
# tests/all.sh does, so a bench works on a fresh machine. qemu's tools come
# from bookworm, like tests/all.sh's, to match the preinstalled qemu-utils.
bench_need() { # command...
  local pkgs=() t
  for t in "$@"; do
    command -v "$t" >/dev/null && continue
    case $t in
      qemu-nbd|qemu-img|qemu-storage-daemon) pkgs+=(qemu-utils/bookworm) ;;
      perf) pkgs+=(linux-perf) ;;
      *) pkgs+=("$t") ;;
    esac
  done
  [ ${#pkgs[@]} -eq 0 ] && return 0
  echo "installing: ${pkgs[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${pkgs[@]}" >&2 ||
    { echo "could not install ${pkgs[*]}" >&2; return 1; }
}

# A fully allocated file, so reads hit real blocks for every server.
bench_fill() { # image size
  fio --name=fill --filename="$1" --size="$2" --rw=write --bs=1M --ioengine=psync \
      --direct=1 --output=/dev/null
}

# Read the whole image into the page cache in 4 KiB folios. Readahead (a
# plain `cat`) caches it in large folios, and on this kernel's ext4 every
# 4 KiB buffered write into a large folio then walks the folio's buffer
# heads (ext4_block_write_begin): random 4 KiB writes fell from ~250k to
# ~25k IOPS for blkshim and qemu-storage-daemon alike. fio's own jobs
# drop the cache first (invalidate=1) and never see it. With readahead
# off (POSIX_FADV_RANDOM) the cache is filled page by page instead.
bench_warm() { # image size
  fio --name=warm --filename="$1" --size="$2" --rw=read --bs=64k --ioengine=psync \
      --fadvise_hint=random --invalidate=0 --output=/dev/null
}

# Wait for a server's unix socket; on failure show the servers' logs.
bench_wait_socket() { # path workdir
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "server did not start; its log:" >&2
  cat "$2"/*.log >&2 || true
  exit 1
}

# The command line of an NBD server serving IMG as export "vm" on SOCK
# (blkshim's control socket and epochs in WORK): blkshim, qemu-nbd,
# nbdkit (file plugin), qemu-storage-daemon, or nbdkit-memory (no device:
# the limit of the client and socket). MODE none is O_DIRECT where the
# server has it (nbdkit's cache=none only drops pages with fadvise).
bench_nbd_server_cmd() { # name mode blkshim img sock work size
  local name=$1 mode=$2 blkshim=$3 img=$4 sock=$5 work=$6 size=$7
  local qc=writeback nc=default qd=off
  [ "$mode" = none ] && qc=none nc=none qd=on
  case $name in
    blkshim) echo "$blkshim serve --cache=$mode --socket=$sock --control=$work/ctl.sock --state-dir=$work/epochs vm=$img" ;;
    qemu-nbd) echo "qemu-nbd --aio=io_uring --cache=$qc -f raw -x vm --shared=16 --persistent --socket=$sock $img" ;;
    nbdkit) echo "nbdkit --foreground --exit-with-parent -U $sock -e vm file $img cache=$nc" ;;
    qemu-storage-daemon) echo "qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$img,cache.direct=$qd,aio=io_uring --nbd-server addr.type=unix,addr.path=$sock,max-connections=16 --export type=nbd,id=e,node-name=f,name=vm,writable=on" ;;
    nbdkit-memory) echo "nbdkit --foreground --exit-with-parent -U $sock -e vm memory $size" ;;
    *) echo "unknown NBD server $name" >&2; return 2 ;;
  esac
}

# fio's JSON output (stdin, after any leading text) -> "IOPS MB/s".
bench_fio_iops_mbps() {
  python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6
print("%.0f %.1f" % (iops, bw))'
}

# "IOPS MB/s;IOPS MB/s;..." -> the median run by IOPS ("fail" runs count lowest).
bench_median() { # runs
  python3 -c '
import sys
runs = [r.split() for r in sys.argv[1].split(";") if r]
runs.sort(key=lambda r: -1.0 if r[0] == "fail" else float(r[0]))
print(" ".join(runs[len(runs) // 2]))' "$1"
}

# Every round's IOPS of each cell, in round order. $1 names the bench's
# associative array of runs, keyed "MODE|SERVER|JOB", each value
# "IOPS MB/s;IOPS MB/s;..."; $2 the modes and $3 the servers
# (space-separated); the job names follow.
bench_print_rounds() { # runs-array modes servers job...
  local -n rounds_of=$1
  local modes=$2 servers=$3 mode j srv x rs
  shift 3
  printf '\nIOPS of each round, in order:\n'
  for mode in $modes; do
    for j in "$@"; do
      printf '%-10s %-22s' "$mode" "$j"
      for srv in $servers; do
        printf ' %s:' "$srv"
        IFS=';' read -ra rs <<<"${rounds_of[$mode|$srv|$j]}"
        for x in "${rs[@]}"; do printf ' %s' "${x%% *}"; done
      done
      printf '\n'
    done
  done
}

# The servers in round R's order: rotated left by R-1, so no server always
# runs first (after a pause) or right after another's write-back.
bench_rotate() { # round server...
  local r=$1; shift
  local a=("$@") n=$# i
  for ((i = 0; i < n; i++)); do printf '%s ' "${a[$(((i + r - 1) % n))]}"; done
}

# Round by round, how often the first server was ahead of each other one
# (rounds are paired: round i of every server ran back to back, in
# rotated order). Arguments as bench_print_rounds.
bench_print_wins() { # runs-array modes servers job...
  local -n wins_of=$1
  local modes=$2 servers=$3 mode j srv first
  shift 3
  first=${servers%% *}
  printf '
Rounds in which %s was ahead of each column (paired by round):\n' "$first"
  for mode in $modes; do
    for j in "$@"; do
      printf '%-10s %-22s' "$mode" "$j"
      for srv in ${servers#"$first"}; do
        python3 -c '
import sys
a = [r.split()[0] for r in sys.argv[1].split(";") if r]
b = [r.split()[0] for r in sys.argv[2].split(";") if r]
f = lambda x: -1.0 if x == "fail" else float(x)
w = sum(1 for x, y in zip(a, b) if f(x) > f(y))
print(" %s: %d of %d" % (sys.argv[3], w, min(len(a), len(b))), end="")' \
          "${wins_of[$mode|$first|$j]}" "${wins_of[$mode|$srv|$j]}" "$srv"
      done
      printf '\n'
    done
  done
}

# Per request, from perf stat's CSV (`perf stat -x, -o CSV`): CPU time,
# context switches and system calls by kind. $1 the CSV, $2 the requests
# served, $3 who the counters are of (a server, or fio itself).
bench_perf_per_request() { # csv requests who
  python3 - "$@" <<'EOF'
import sys
csv, ios, who = sys.argv[1], int(sys.argv[2]), sys.argv[3]
counts = {}
for line in open(csv):
    f = line.strip().split(",")
    if len(f) < 3 or line.startswith("#"):
        continue
    try:
        counts[f[2]] = float(f[0])
    except ValueError:
        pass
cpu = counts.get("task-clock", 0) * 1e6  # msec -> ns
print(f"  {who} CPU per request: {cpu / ios / 1000:.2f} us; context switches per request: "
      f"{counts.get('context-switches', 0) / ios:.3f}")
print(f"  system calls per request: {counts.get('raw_syscalls:sys_enter', 0) / ios:.2f}:", end="")
for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
    if k.startswith("syscalls:sys_enter_") and v > 0:
        print(f" {k[len('syscalls:sys_enter_'):]} {v / ios:.3f}", end="")
print()
EOF
}
