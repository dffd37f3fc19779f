#!/usr/bin/env bash
# Every test of blkshim, on a fresh machine: installs what is missing, then
# runs lint, the unit/integration/doc tests (real qemu, libnbd and fio peers
# among them), the 20,000-seed simulation, the fuzz targets briefly, and
# the qemu live-migration harness, and the real-Xen harness (Xen 4.17 under
# qemu: seeds/003 on xen-blkback must corrupt, on blkshim must not). Exits
# non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# Debug builds here keep file:line for panics and backtraces, not full
# debuginfo: linking some 30 test binaries of 120 MB each was minutes of
# this run on 2 cores. Every cargo command below (and in the harness
# scripts it starts) shares the setting, so their builds are reused.
export CARGO_PROFILE_DEV_DEBUG=line-tables-only

start=$(date +%s)
section() { printf '\n=== %s === (%d s)\n' "$*" $(( $(date +%s) - start )); }

section "system packages"
# qemu-system-x86 from Debian conflicts with the newer preinstalled
# qemu-utils, so both come from bookworm together.
pkgs=()
command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm)
command -v qemu-io >/dev/null || pkgs+=(qemu-utils/bookworm)
command -v fio >/dev/null || pkgs+=(fio)
command -v nbdinfo >/dev/null || pkgs+=(libnbd-bin)
# nbdsh is python: the Debian interpreter needs the nbd module.
/usr/bin/python3 -c 'import nbd' 2>/dev/null || pkgs+=(python3-libnbd)
command -v nbdkit >/dev/null || pkgs+=(nbdkit)
# tests/nbd_tls.rs makes its CA and certificates with the openssl CLI.
command -v openssl >/dev/null || pkgs+=(openssl)
[ -x /bin/busybox ] || pkgs+=(busybox-static)
command -v cpio >/dev/null || pkgs+=(cpio)
dpkg -s libclang-dev >/dev/null 2>&1 || pkgs+=(libclang-dev)
# The openssl crate (TLS-PSK, `serve --tls-psk`) links libssl via pkg-config.
dpkg -s libssl-dev >/dev/null 2>&1 || pkgs+=(libssl-dev)
command -v pkg-config >/dev/null || pkgs+=(pkg-config)
dpkg -s libxen-dev >/dev/null 2>&1 || pkgs+=(libxen-dev)
# qemu-harness/xen.sh: device-mapper in dom0, the static probe, strip.
command -v dmsetup >/dev/null || pkgs+=(dmsetup)
dpkg -s libc6-dev >/dev/null 2>&1 || pkgs+=(libc6-dev)
command -v strip >/dev/null || pkgs+=(binutils)
# --features sanlock links libsanlock_client; its layout test compiles C
# against the headers.
dpkg -s libsanlock-dev >/dev/null 2>&1 || pkgs+=(libsanlock-dev)
# tests/epoch_etcd.rs runs /usr/bin/etcd members of its own on free
# loopback ports.
[ -x /usr/bin/etcd ] || pkgs+=(etcd-server)
# tests/epoch_etcd.rs cuts a member off with nftables inside network
# namespaces of its own (ip netns, a bridge, veth pairs: iproute2).
command -v nft >/dev/null || pkgs+=(nftables)
command -v ip >/dev/null || pkgs+=(iproute2)
# tests/systemd_units.rs and tests/package_deb.sh: systemd-analyze verify
# (no systemd as PID 1 needed), and man for the packaged man pages.
command -v systemd-analyze >/dev/null || pkgs+=(systemd)
command -v man >/dev/null || pkgs+=(man-db)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "installing: ${pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${pkgs[@]}" >/dev/null
fi
# Installing etcd-server starts etcd.service on :2379 where an init system
# runs: the tests never use it, so stop it.
if [ -x /usr/bin/etcd ]; then
  systemctl disable --now etcd >/dev/null 2>&1 || service etcd stop >/dev/null 2>&1 || true
fi

section "format and lint"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The FFI to the real Xen libraries is code too.
cargo clippy --all-targets --features xen,sanlock -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
# The library as it ships (clippy --all-targets sees it with the tests'
# test-utils feature on), and proof that a release build has no emulation.
cargo clippy --lib -- -D warnings
# The C API crate (a workspace member: plain cargo commands here skip it).
cargo clippy -p blkshim-capi --all-targets -- -D warnings
bash tests/no-emulation-in-release.sh

section "unit, integration and doc tests (the simulation's 20,000 protected seeds among them)"
# The bindings drift test must regenerate here (libclang and libxen-dev
# were installed above), never quietly skip.
export BLKSHIM_REQUIRE_XEN_BINDGEN=1
# Every test target but tests/epoch_etcd.rs, whose real etcd clusters spend
# most of their two minutes waiting out elections, leases and partitions:
# it runs in the background beside the fuzz section below and must pass
# there. The same targets as a plain `cargo test`, examples built too.
tests_here=()
for f in tests/*.rs; do
  t=$(basename "$f" .rs)
  [ "$t" = epoch_etcd ] || tests_here+=(--test "$t")
done
cargo test --lib --bins "${tests_here[@]}"
cargo test --doc
cargo build --examples -q
etcd_log=$(mktemp)
cargo test --test epoch_etcd >"$etcd_log" 2>&1 &
etcd_pid=$!
# A section failing before its wait leaves no etcd test running behind CI.
trap 'kill "$etcd_pid" 2>/dev/null || true' EXIT

section "C API: tests/c/handoff.c with cc (shared, and static under ASan/UBSan), header drift"
cargo test -p blkshim-capi

section "Debian package: built (debug build), extracted, its blkshim serve run, its units verified"
# The debug build keeps this to about a minute (the release build of the
# package costs several more); cargo-deb is installed once when missing
# (cargo install: about 7 minutes on 2 cores).
bash tests/package_deb.sh

section "Xen: link and call the real libxenstore/libxengnttab/libxenevtchn"
cargo test --features xen --test xen_real

section "sanlock: the FFI's struct layouts against the C headers, linked"
cargo test --features sanlock --lib storage::fencing::sanlock


section "fuzz targets, briefly"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo-fuzz needs nightly flags: use a nightly toolchain when the machine
# has one, else let stable accept them.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then fuzz=(cargo +nightly fuzz); else fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz); fi
for target in $(cargo fuzz list --fuzz-dir fuzz 2>/dev/null || ls fuzz/fuzz_targets | sed 's/\.rs$//'); do
  # --dev: the dependency tree with ASan and coverage at opt-level 0 builds in
  # half the time of the release profile (3.4 vs 7.4 min here); debug
  # assertions stay on as in cargo-fuzz's default, and 10 s per target is a
  # smoke run, not a campaign (benches/ and the README say how to fuzz long).
  "${fuzz[@]}" run --dev --fuzz-dir fuzz "$target" -- -max_total_time="${FUZZ_SECONDS:-10}" -rss_limit_mb=2048
done

section "etcd: tests/epoch_etcd.rs (real etcd clusters: leader killed, frozen, cut off by nftables, quorum lost), run beside the sections above"
etcd_rc=0
wait "$etcd_pid" || etcd_rc=$?
trap - EXIT
cat "$etcd_log"
[ "$etcd_rc" = 0 ] || { echo "tests/epoch_etcd.rs failed (exit $etcd_rc)"; exit 1; }

# qemu-harness/run.sh ARGS. A run in which a scenario ended in a harness
# ERROR (a setup step broke, so no verdict: e.g. a qemu lost under load, or
# qemu-storage-daemon's vu_panic on a departed frontend in the control) and
# no scenario got a wrong verdict gets one rerun, said out loud; a wrong
# verdict never does. Wrong: a plain FAIL, or in a control (--expect-
# unfenced) a PASS or a FAIL without stale data landing.
# The first run probes KVM (a 20 s boot that hangs on this machine kind
# before it falls back to TCG); the later runs take its answer.
harness_accel=()
harness() {
  local rlog rc=0
  rlog=$(mktemp)
  bash qemu-harness/run.sh "${harness_accel[@]}" "$@" 2>&1 | tee "$rlog" || rc=$?
  if [ ${#harness_accel[@]} -eq 0 ]; then
    local a
    a=$(grep -oE "(kvm probe.*|no /dev/kvm): using (kvm|tcg)$" "$rlog" | grep -oE "(kvm|tcg)$" | tail -1 || true)
    [ -n "$a" ] && harness_accel=(--accel "$a") && echo "run.sh: later runs use --accel $a (the probe's answer)"
  fi
  [ $rc -eq 0 ] && return 0
  if grep -qE "^  ERROR" "$rlog" &&
     ! grep -qE "^  FAIL  |^  (PASS|FAIL) \(expected a stale landing!\)" "$rlog"; then
    echo "run.sh: a scenario ended in a harness error, not a verdict; rerunning once"
    bash qemu-harness/run.sh "${harness_accel[@]}" "$@"
  else
    return 1
  fi
}

section "qemu harness: a real guest live-migrated 20 times under fio, writes held at the storage across a hand-off, and the fault scenarios"
# 20 migrations, the disk's epoch checked after each, every block checked
# for the last fio round's stamp (a valid block of an earlier round fails).
harness --migrations 20 --interval 2 --timeout 1200

section "qemu harness negative control: against qemu-nbd the same scenarios must land stale data"
# migrate: an old epoch's replay of an early round's valid block lands, and
# only the round check catches it (a 16 MiB disk: rounds are short).
harness --nbd-server qemu-nbd --expect-unfenced --migrations 2 --interval 2 --disk-mb 16 \
  --scenarios migrate,held-at-storage,cutoff,failover,failback

section "vhost-user-blk: the harness guest booted from blkshim's vhost-user-blk export, live-migrated under fio verify, writes held at the storage, cut off, killed and failed back with requests held in its virtqueues, blkshim restarted under it; the unfenced control on qemu-storage-daemon"
# The same scenarios as over NBD, each qemu on a socket of its own at its
# epoch. migrate: the disk's epoch is checked after each migration, every
# block is verified, and a block of round 1 replayed from the first epoch
# must be refused. held-at-storage: writes held at the storage across a
# live migration and two cut-off hand-offs. cutoff/failover/failback: a vhost-user proxy
# (qemu-harness/vhostproxy.py) holds the source's kicks, so its requests
# stay in the virtqueues unseen by the backend; the source is frozen or
# killed, the VM starts fresh at the next epoch, and the released requests
# must be refused. Against qemu-storage-daemon's vhost-user-blk export (no
# epochs) the released requests land, and every fault scenario must FAIL for
# that reason. reconnect (blkshim only): blkshim is restarted 3
# times under the guest's fio verify load and qemu (reconnect=1) picks the
# disk up again: the guest's I/O must resume and every block verify. held-at-storage as over NBD, with a longer delay and
# deadline (a TCG destination under load may take over 10 s to write).
export HELD_DELAY=20 HELD_FENCE_TIMEOUT=8
harness --transport vhost-user-blk --migrations 4 --interval 2 --timeout 900
# The migrations again through the page cache, where the worker hands chains
# back two at a time and reads land in guest RAM in place (their pages in
# qemu's dirty log, or the destination's fio verify fails).
export BLKSHIM_ARGS="serve --socket {sock} --control {ctl} --state-dir {state} --cache writeback {name}={img} --size {size}"
harness --transport vhost-user-blk --migrations 4 --interval 2 --timeout 600 --scenarios migrate
unset BLKSHIM_ARGS
# The control runs the fault scenarios, not migrate: qemu-storage-daemon 7.2
# answers GET_VRING_BASE without waiting for its requests in flight, so a
# live migration under load can lose requests and leave the guest waiting
# forever (4 of 12 runs here, README): no verdict. Its migrate scenario's
# guard (an old epoch's replay refused) has its control over NBD above.
harness --transport vhost-user-blk --nbd-server qemu-nbd --expect-unfenced \
  --scenarios held-at-storage,cutoff,failover,failback --timeout 900
unset HELD_DELAY HELD_FENCE_TIMEOUT

section "host-side fencing on a real kernel target: seeds/002 on LIO, then two blkshim hosts with --fence pr (migrate, cut-off, failover, failback)"
bash qemu-harness/hostside.sh

section "host-side negative control: --fence none with the source confirmed dead (falsely) must land stale blocks in every fault scenario"
bash qemu-harness/hostside.sh --fence none --expect-unfenced

section "sanlock leases on real sanlock daemons (softdog, wdmd) in the same guest: a cut-off holder is killed, the taker waits out host_dead"
bash qemu-harness/sanlock.sh

section "real Xen under qemu: seeds/003 on xen-blkback (must corrupt) and blkshim (must not)"
# Two things here are the emulation's, not blkshim's, and get a rerun, said
# out loud: a PVH guest dying of a triple fault under TCG, and a race that
# timing did not arm (the probe never saw its suspend with writes in flight,
# or the negative control's stale write landed before the newer ones on a
# slow host). Only those scenarios are rerun, on their back end, at most
# twice. A blkshim scenario that lands stale data in a valid, armed run is
# never rerun; any other failure is not either.
# --delay 40 (default 30): a wider window for the negative control's race.
xen_run() { WORKDIR=$(mktemp -d /tmp/xh-XXXXXX) && export WORKDIR && bash qemu-harness/xen.sh --delay 40 "$@"; }
# xen_retry RESULTS: prints "BACKEND SCENARIO,..." lines to rerun; fails if a
# failure may not be rerun.
xen_retry() {
  local res=$1 line be sc
  declare -A again=()
  local all
  all=$(cat "$res")
  [ -n "$all" ] || { echo "xen.sh left no results" >&2; return 1; }
  while read -r line; do
    be=$(awk '{print $3}' <<<"$line"); sc=$(awk '{print $2}' <<<"$line")
    if grep -q "INVALID\|armed=0\|triple_faults=[1-9]" <<<"$line"; then
      again[$be]+="${again[$be]:+,}$sc"
    elif [ "$be" = blkback ]; then
      again[$be]+="${again[$be]:+,}$sc"   # the negative control's race, not armed
    else
      echo "not rerun: $line" >&2; return 1
    fi
  done < <(grep "^XEN-RESULT [a-z]* [a-z]* FAIL" <<<"$all")
  for be in "${!again[@]}"; do echo "$be ${again[$be]}"; done
}
# Every planned scenario must have a verdict in the first run's results: a
# run cut short never reads as a pass.
xen_complete() {
  local pair ok=0
  for pair in "save blkback" "migrate blkback" "selftest blkshim" "save blkshim" "migrate blkshim" \
    "hooked blkshim" "destroy blkshim" "features blkshim" "teardown blkshim"; do
    grep -q "^XEN-RESULT $pair " "$1" 2>/dev/null || { echo "xen.sh: no verdict for $pair" >&2; ok=1; }
  done
  return $ok
}
if ! xen_run; then
  xen_complete "$WORKDIR/results" || exit 1
  results=("$WORKDIR/results")
  for attempt in 1 2; do
    plan=$(cat "${results[@]}" 2>/dev/null | xen_retry /dev/stdin) || exit 1
    [ -n "$plan" ] || exit 1
    results=()
    while read -r be sc; do
      echo "xen.sh: rerunning $sc on $be (attempt $attempt): a guest crashed under TCG or a race was not armed"
      xen_run --backend "$be" --scenarios "$sc" && continue
      results+=("$WORKDIR/results")
    done <<<"$plan"
    [ ${#results[@]} = 0 ] && break
    [ $attempt = 2 ] && exit 1
  done
else
  xen_complete "$WORKDIR/results" || exit 1
fi
