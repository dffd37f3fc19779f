#!/usr/bin/env bash
# The device's own IOPS at each queue depth: fio's io_uring straight on an
# image file, O_DIRECT, 4 KiB random I/O, one job, QD 1..32, the median of
# interleaved rounds. It says what a server that keeps a mean of N requests
# at the device can get from it at best: the yardstick for
# benches/nbd_profile.sh's "device in flight" (README, "Where that gap goes").
#
#   benches/device_qd.sh [--rw=randread] [--depths=1,2,4,8,12,16,24,32]
#                        [--size=1G] [--runtime=3] [--repeat=3] [--dir=DIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/common.sh
. "$HERE/common.sh"

rw=randread depths=1,2,4,8,12,16,24,32 size=1G runtime=3 repeat=3 dir=
for a in "$@"; do
  case $a in
    --rw=*) rw=${a#*=} ;;
    --depths=*) depths=${a#*=} ;;
    --size=*) size=${a#*=} ;;
    --runtime=*) runtime=${a#*=} ;;
    --repeat=*) repeat=${a#*=} ;;
    --dir=*) dir=${a#*=} ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "device_qd.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

bench_need fio

work=$(mktemp -d ${dir:+-p "$dir"})
trap 'rm -rf "$work"' EXIT
img=$work/device.img
bench_fill "$img" "$size"

IFS=, read -ra qds <<<"$depths"
declare -A runs
for ((r = 1; r <= repeat; r++)); do
  for qd in "${qds[@]}"; do
    out=$(fio --name=dev --filename="$img" --size="$size" --rw="$rw" --bs=4k \
              --ioengine=io_uring --direct=1 --iodepth="$qd" --numjobs=1 \
              --time_based --runtime="$runtime" --output-format=json)
    runs[$qd]+="$(bench_fio_iops_mbps <<<"$out");"
  done
done

echo "fio $(fio --version), $size file, $rw 4k O_DIRECT io_uring, ${runtime}s per cell, median of $repeat, $(uname -r)"
printf '%5s %10s %8s\n' QD IOPS MB/s
for qd in "${qds[@]}"; do
  read -r iops mbps <<<"$(bench_median "${runs[$qd]}")"
  printf '%5s %10s %8s\n' "$qd" "$iops" "$mbps"
done
