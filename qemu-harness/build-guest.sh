#!/bin/bash
# Build the harness guest (kernel + initramfs) from Debian packages only.
#
# Output: $CACHE/guest-<hash>/{vmlinuz,initrd.gz}, and the path of that
# directory on stdout (last line). <hash> covers this script, the guest's
# /init, the module resolver and the package versions, so any change to the
# inputs builds a new guest; an unchanged one is reused.
#
# Nothing is installed: the kernel, fio and busybox-static .debs are fetched
# with `apt-get download` and unpacked with `dpkg -x`. fio's shared libraries
# (found by ldd on the host) and the dynamic loader are copied in.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CACHE:-$HERE/.cache}
MODULES="virtio_pci virtio_blk"

log() { echo "build-guest: $*" >&2; }
# A command that fails under set -e says where, not just an exit status.
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR

# The kernel: the image package the linux-image-amd64 metapackage currently
# points at (candidate version), e.g. linux-image-6.1.0-56-amd64.
KPKG=${KPKG:-$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}')}
[ -n "$KPKG" ] || { log "cannot find the kernel package (apt-get update?)"; exit 1; }
. "$HERE/debs.sh" # cand, fetch
KVER=$(cand "$KPKG")
FIOVER=$(cand fio)
BBVER=$(cand busybox-static)
for v in "$KVER" "$FIOVER" "$BBVER"; do
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then log "package version missing (kernel=$KVER fio=$FIOVER busybox=$BBVER)"; exit 1; fi
done

HASH=$( { cat "$0" "$HERE/guest-init.sh" "$HERE/modorder.py"; echo "$KPKG=$KVER fio=$FIOVER busybox-static=$BBVER"; } | sha256sum | cut -c1-16)
OUT=$CACHE/guest-$HASH
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ]; then
    log "cached guest $OUT ($KPKG $KVER, fio $FIOVER)"
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE/debs"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT


log "fetching $KPKG=$KVER fio=$FIOVER busybox-static=$BBVER"
for spec in "$KPKG:$KVER:kernel" "fio:$FIOVER:fio" "busybox-static:$BBVER:busybox"; do
    pkg=${spec%%:*}; rest=${spec#*:}; dir=${rest##*:}; ver=${rest%:*}
    deb=$(fetch "$pkg" "$ver")
    mkdir -p "$WORK/$dir"
    dpkg -x "$deb" "$WORK/$dir"
done

ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,lib,lib64,usr/bin}
ln -s ../lib "$ROOT/usr/lib" # merged /usr, as on the host

# Kernel image and the modules the disk needs (config says which are modules).
KREL=$(ls "$WORK/kernel/lib/modules")
cp "$WORK/kernel/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
KCONF=$WORK/kernel/boot/config-$KREL
grep -E '^CONFIG_(VIRTIO|VIRTIO_PCI|VIRTIO_BLK|SERIAL_8250_CONSOLE|DEVTMPFS|BLK_DEV_INITRD|RD_GZIP)=' "$KCONF" | tr '\n' ' ' | sed 's/^/build-guest: kernel config: /' >&2; echo >&2
for need in BLK_DEV_INITRD RD_GZIP DEVTMPFS SERIAL_8250_CONSOLE; do
    grep -q "^CONFIG_$need=y" "$KCONF" || { log "kernel lacks CONFIG_$need=y"; exit 1; }
done
MODROOT=$WORK/kernel/lib/modules/$KREL
python3 "$HERE/modorder.py" "$MODROOT" $MODULES >"$ROOT/etc/modules.order"
while read -r m; do
    mkdir -p "$ROOT/lib/modules/$(dirname "$m")"
    cp "$MODROOT/$m" "$ROOT/lib/modules/$m"
done <"$ROOT/etc/modules.order"
log "modules (load order): $(tr '\n' ' ' <"$ROOT/etc/modules.order")"

# busybox (static) and fio with its libraries and the dynamic loader.
cp "$WORK/busybox/bin/busybox" "$ROOT/bin/busybox"
cp "$WORK/fio/usr/bin/fio" "$ROOT/usr/bin/fio"
libs=$(ldd "$ROOT/usr/bin/fio" | awk '/=> \//{print $3} /^\t\/lib/{print $1}')
if ldd "$ROOT/usr/bin/fio" | awk '/not found/{n++} END{exit !n}'; then
    log "fio libraries missing on the host (install fio's dependencies):"
    ldd "$ROOT/usr/bin/fio" | grep 'not found' >&2
    exit 1
fi
for l in $libs; do
    d=$ROOT$(dirname "$l")
    mkdir -p "$d"
    cp -L "$l" "$d/"
done
# The loader is found via PT_INTERP (/lib64/ld-linux-x86-64.so.2); the
# libraries by their ldd paths, which the loader's default paths cover.
[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"

cp "$HERE/guest-init.sh" "$ROOT/init"
chmod 755 "$ROOT/init" "$ROOT/bin/busybox" "$ROOT/usr/bin/fio"
ln -s /bin/busybox "$ROOT/bin/sh"

(cd "$ROOT" && find . | LC_ALL=C sort | cpio --quiet -o -H newc | gzip -1) >"$WORK/initrd.gz"
mkdir -p "$OUT.tmp"
mv "$WORK/vmlinuz" "$WORK/initrd.gz" "$OUT.tmp/"
echo "$KPKG $KVER fio $FIOVER busybox-static $BBVER modules: $(tr '\n' ' ' <"$ROOT/etc/modules.order")" >"$OUT.tmp/INFO"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "built $OUT: initrd $(du -h "$OUT/initrd.gz" | cut -f1), kernel $(du -h "$OUT/vmlinuz" | cut -f1)"
echo "$OUT"
