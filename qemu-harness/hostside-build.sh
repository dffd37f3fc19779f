#!/bin/bash
# Build the host-side fencing guest (kernel + initramfs) from Debian packages
# only: the kernel package build-guest.sh picks, busybox-static, and the LIO
# modules (configfs, target_core_mod, target_core_file, tcm_loop, sd_mod and
# their dependencies, in the load order modorder.py gives).
#
# Output: $CACHE/hostside-<hash>/{vmlinuz,initrd.gz,INFO}, and the path of
# that directory on stdout (last line). <hash> covers this script, the
# guest's /init (hostside-init.sh), modorder.py and the package versions;
# an unchanged guest is reused. The binaries under test are not in it:
# hostside.sh appends them as a second cpio archive at every run.
#
# Nothing is installed: the .debs are fetched with `apt-get download` (into
# the cache build-guest.sh shares) and unpacked with `dpkg -x`.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CACHE:-$HERE/.cache}
MODULES="configfs target_core_mod target_core_file tcm_loop sd_mod"
# --- blkshim host-side scenarios (hostside-guest.sh): a device-mapper delay
# target in front of /dev/sda and /dev/sdb holds writes "queued toward the
# storage" (dmsetup itself comes from the host, with the binaries).
MODULES="$MODULES dm_mod dm_delay"
# ---

log() { echo "hostside-build: $*" >&2; }
# A command that fails under set -e says where, not just an exit status.
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR

# The kernel: as build-guest.sh, the image package the linux-image-amd64
# metapackage currently points at (candidate version).
KPKG=${KPKG:-$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}')}
[ -n "$KPKG" ] || { log "cannot find the kernel package (apt-get update?)"; exit 1; }
. "$HERE/debs.sh" # cand, fetch
KVER=$(cand "$KPKG")
BBVER=$(cand busybox-static)
for v in "$KVER" "$BBVER"; do
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then log "package version missing (kernel=$KVER busybox=$BBVER)"; exit 1; fi
done

HASH=$( { cat "$0" "$HERE/hostside-init.sh" "$HERE/modorder.py"; echo "$KPKG=$KVER busybox-static=$BBVER $MODULES"; } | sha256sum | cut -c1-16)
OUT=$CACHE/hostside-$HASH
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ]; then
    log "cached guest $OUT ($KPKG $KVER)"
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE/debs"
WORK=$(mktemp -d "$CACHE/hostside-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT


log "fetching $KPKG=$KVER busybox-static=$BBVER"
for spec in "$KPKG:$KVER:kernel" "busybox-static:$BBVER:busybox"; do
    pkg=${spec%%:*}; rest=${spec#*:}; dir=${rest##*:}; ver=${rest%:*}
    deb=$(fetch "$pkg" "$ver")
    mkdir -p "$WORK/$dir"
    dpkg -x "$deb" "$WORK/$dir"
done

ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,lib,lib64,usr/bin,payload}
ln -s ../lib "$ROOT/usr/lib" # merged /usr, as on the host

KREL=$(ls "$WORK/kernel/lib/modules")
cp "$WORK/kernel/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
KCONF=$WORK/kernel/boot/config-$KREL
for need in BLK_DEV_INITRD RD_GZIP DEVTMPFS SERIAL_8250_CONSOLE; do
    grep -q "^CONFIG_$need=y" "$KCONF" || { log "kernel lacks CONFIG_$need=y"; exit 1; }
done
for need in CONFIGFS_FS TARGET_CORE TCM_FILEIO LOOPBACK_TARGET BLK_DEV_SD BLK_DEV_DM DM_DELAY; do # DM_*: host-side scenarios
    grep -qE "^CONFIG_$need=(y|m)" "$KCONF" || { log "kernel lacks CONFIG_$need"; exit 1; }
done
MODROOT=$WORK/kernel/lib/modules/$KREL
python3 "$HERE/modorder.py" "$MODROOT" $MODULES >"$ROOT/etc/modules.order"
while read -r m; do
    mkdir -p "$ROOT/lib/modules/$(dirname "$m")"
    cp "$MODROOT/$m" "$ROOT/lib/modules/$m"
done <"$ROOT/etc/modules.order"
log "modules (load order): $(tr '\n' ' ' <"$ROOT/etc/modules.order")"

cp "$WORK/busybox/bin/busybox" "$ROOT/bin/busybox"
cp "$HERE/hostside-init.sh" "$ROOT/init"
chmod 755 "$ROOT/init" "$ROOT/bin/busybox"
ln -s /bin/busybox "$ROOT/bin/sh"

(cd "$ROOT" && find . | LC_ALL=C sort | cpio --quiet -o -H newc | gzip -1) >"$WORK/initrd.gz"
mkdir -p "$OUT.tmp"
mv "$WORK/vmlinuz" "$WORK/initrd.gz" "$OUT.tmp/"
echo "$KPKG $KVER busybox-static $BBVER modules: $(tr '\n' ' ' <"$ROOT/etc/modules.order")" >"$OUT.tmp/INFO"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "built $OUT: initrd $(du -h "$OUT/initrd.gz" | cut -f1), kernel $(du -h "$OUT/vmlinuz" | cut -f1)"
echo "$OUT"
