#!/usr/bin/env bash
# Builds the Debian package (target/debian/blkshim_VERSION-1_ARCH.deb) with
# cargo-deb: the binary, the systemd units, the man pages, the example
# config (a conffile) and the README. See [package.metadata.deb] in
# Cargo.toml.
#
#   packaging/build-deb.sh            release build (what you ship)
#   packaging/build-deb.sh --dev      the debug build (fast: what tests use)
#   FEATURES=xen packaging/build-deb.sh
#       with the real Xen libraries (needs libxen-dev at build time; the
#       package then depends on Debian's libxen* through $auto). Without
#       it, `blkshim xen-backend` says it was built without Xen support.
set -euo pipefail
cd "$(dirname "$0")/.."

# The version tested; newer ones may refuse --dev (the dev profile). A
# debug build of the tool itself: it compiles in about half the time of a
# release build (CI installs it on a fresh machine) and packs a few MB fast
# enough.
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0 --debug

# Man pages rendered from the clap definitions (examples/mangen.rs), gzip'd
# without timestamps as Debian policy asks.
rm -rf target/man
cargo run --quiet --example mangen -- target/man
gzip -9n target/man/*.1

args=()
if [ -n "${FEATURES:-}" ]; then args+=(--features "$FEATURES"); fi
if [ "${1:-}" = --dev ]; then args+=(--profile dev); fi
cargo deb "${args[@]}"
