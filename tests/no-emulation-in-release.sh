#!/usr/bin/env bash
# A default `cargo build --release` compiles no emulation code into blkshim
# (issue #11): the emulated Xen platform, grants, event channels and
# xenstore, the emulated blkfront (xen::frontend_emu), the fuzz entry
# (xen::fuzz), the adversarial storage (xen::testing) and the unprotected
# data path all sit behind feature `test-utils`, which only tests, benches
# and fuzz targets enable.
#
# The check reads the symbol tables (nm) of the release library and binary:
# no function of those modules may be there. (Not `strings`: an rlib's
# metadata keeps doc comments, and production docs name the emulation.)
# Generic code has no symbol until it is used, so a symbol check alone could
# miss it; the API check below compiles a probe that names the test doubles
# against the default library and expects it to fail.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
pattern='emulat|frontend_emu|xen::testing|xen::fuzz|fuzz_blkif|adversarial|Unprotected'

cargo build --release --quiet
fail=0
# Each file with a symbol it must have, so the check is not vacuous: the
# library's production Xen data path, the binary's NBD server.
for pair in "libblkshim.rlib blkshim::xen::dataplane" "blkshim blkshim::nbd"; do
  read -r file sentinel <<<"$pair"
  f="$target/release/$file"
  syms=$(nm -C "$f" 2>/dev/null)
  if ! grep -q "$sentinel" <<<"$syms"; then
    echo "FAIL: no $sentinel symbols in $f: nm cannot read it?"
    fail=1
    continue
  fi
  found=$(grep -iE "$pattern" <<<"$syms" | cut -c 20- | sort -u || true)
  if [ -n "$found" ]; then
    echo "FAIL: emulation symbols in $f ($(wc -l <<<"$found")):"
    head -20 <<<"$found"
    fail=1
  else
    echo "ok: $f: $(wc -l <<<"$syms") symbols, none matching /$pattern/i"
  fi
done

# API check: the default library exports none of the test doubles (and no
# unprotected switch). Each probe must fail to compile; rustc is fed the
# release rlib directly, so this costs no rebuild.
deps="$target/release/deps"
probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
for item in \
  'blkshim::xen::grant::EmulatedGuest' \
  'blkshim::xen::evtchn::EmulatedEventChannel' \
  'blkshim::xen::xenstore::EmulatedXenStore' \
  'blkshim::xen::platform::EmulatedPlatform' \
  'blkshim::xen::frontend_emu::EmulatedFrontend' \
  'blkshim::xen::testing::AdversarialStorage' \
  'blkshim::xen::fuzz_blkif_request'; do
  printf 'use %s as _;\nfn main() {}\n' "$item" >"$probe_dir/probe.rs"
  if rustc --edition 2021 --crate-type bin -A warnings -L "dependency=$deps" \
    --extern blkshim="$target/release/libblkshim.rlib" \
    -o "$probe_dir/probe" "$probe_dir/probe.rs" 2>/dev/null; then
    echo "FAIL: $item is in the default library"
    fail=1
  fi
done
printf 'fn main() { let c = blkshim::xen::backend::BackendConfig::default(); let _ = c.protection; }\n' >"$probe_dir/probe.rs"
if rustc --edition 2021 --crate-type bin -A warnings -L "dependency=$deps" \
  --extern blkshim="$target/release/libblkshim.rlib" \
  -o "$probe_dir/probe" "$probe_dir/probe.rs" 2>/dev/null; then
  echo "FAIL: BackendConfig.protection (the unprotected switch) is in the default library"
  fail=1
fi
# The probe itself works: a production item compiles.
printf 'use blkshim::xen::platform::Platform as _;\nfn main() {}\n' >"$probe_dir/probe.rs"
if ! rustc --edition 2021 --crate-type bin -A warnings -L "dependency=$deps" \
  --extern blkshim="$target/release/libblkshim.rlib" \
  -o "$probe_dir/probe" "$probe_dir/probe.rs"; then
  echo "FAIL: the API probe cannot compile against the release library"
  fail=1
fi
[ "$fail" = 0 ] && echo "ok: the default library exports no test doubles and no unprotected switch"
exit "$fail"
