#!/bin/bash
# Build the real-Xen harness images (xen.sh) from Debian packages only.
#
# Output: $CACHE/xen-<hash>/{xen,vmlinuz,dom0.cpio.gz,INFO} and the path of
# that directory on stdout (last line):
#   xen           the hypervisor: /boot/xen-4.17-amd64.gz of
#                 xen-hypervisor-4.17-amd64, unzipped: an ELF32 image with a
#                 Multiboot1 header, which qemu -kernel loads
#   vmlinuz       the Debian kernel build-guest.sh picks (linux-image-amd64's
#                 dependency), used for dom0 and, inside dom0.cpio.gz, the domU
#   dom0.cpio.gz  dom0's initramfs: busybox, xl & co. (xen-utils-4.17),
#                 xenstore-utils, dmsetup, their libraries, the modules, and
#                 /root/domU/{vmlinuz,probe.cpio.gz,fio.cpio.gz}: the domU's
#                 kernel and initramfs (busybox, xen-blkfront, xen-genprobe,
#                 xen-loadprobe, xenstore-read; the fio one adds fio and its
#                 libraries)
# blkshim is not part of these: xen.sh appends a second small cpio to
# dom0.cpio.gz at run time (Linux unpacks concatenated gzip'd cpio archives).
#
# <hash> covers this script, the dom0/domU /init scripts, xen-genprobe.c,
# xen-loadprobe.c, xen-xswatch.c,
# modorder.py, the package versions and the host library packages the
# binaries are linked against. Nothing is installed here (xen.sh does that):
# the kernel, xen-hypervisor, xen-utils, xenstore-utils, busybox-static and
# fio .debs are fetched with `apt-get download` and unpacked with `dpkg -x`;
# shared libraries come from the host (found by ldd), like build-guest.sh.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CACHE:-$HERE/.cache}
DOM0_MODULES="xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc xen-blkback loop dm-mod dm-delay"
DOMU_MODULES="xen-blkfront"
XENVER=4.17

log() { echo "build-xen: $*" >&2; }
# A command that fails under set -e says where, not just an exit status.
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR

KPKG=${KPKG:-$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}')}
[ -n "$KPKG" ] || { log "cannot find the kernel package (apt-get update?)"; exit 1; }
. "$HERE/debs.sh" # cand, fetch
inst() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }
PKGS="$KPKG xen-hypervisor-$XENVER-amd64 xen-utils-$XENVER xenstore-utils busybox-static fio"
declare -A VER
for p in $PKGS; do
    VER[$p]=$(cand "$p")
    if [ -z "${VER[$p]}" ] || [ "${VER[$p]}" = "(none)" ]; then log "no candidate version for $p"; exit 1; fi
done
for t in gcc cpio gzip ldd dmsetup python3; do
    command -v "$t" >/dev/null || { log "missing host tool $t (xen.sh installs it)"; exit 1; }
done
HOSTLIBS="libc6 libxenmisc$XENVER libxenstore4 libyajl2 dmsetup libdevmapper1.02.1 libgcc-s1 fio"
hostvers=$(for p in $HOSTLIBS; do echo "$p=$(inst "$p")"; done | tr '\n' ' ')

HASH=$( {
    cat "$0" "$HERE/xen-dom0-init.sh" "$HERE/xen-domU-init.sh" "$HERE/xen-genprobe.c" "$HERE/xen-loadprobe.c" "$HERE/xen-xswatch.c" "$HERE/modorder.py"
    for p in $PKGS; do echo "$p=${VER[$p]}"; done
    echo "$hostvers"
} | sha256sum | cut -c1-16)
OUT=$CACHE/xen-$HASH
if [ -s "$OUT/xen" ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/dom0.cpio.gz" ]; then
    log "cached $OUT ($(sed -n 1p "$OUT/INFO"))"
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE/debs"
WORK=$(mktemp -d "$CACHE/build-xen.XXXXXX")
trap 'rm -rf "$WORK"' EXIT


log "fetching $(for p in $PKGS; do printf '%s=%s ' "$p" "${VER[$p]}"; done)"
X=$WORK/x
mkdir -p "$X/kernel" "$X/xen" "$X/busybox" "$X/fio"
dpkg -x "$(fetch "$KPKG" "${VER[$KPKG]}")" "$X/kernel"
for p in xen-hypervisor-$XENVER-amd64 xen-utils-$XENVER xenstore-utils; do
    dpkg -x "$(fetch "$p" "${VER[$p]}")" "$X/xen"
done
dpkg -x "$(fetch busybox-static "${VER[busybox-static]}")" "$X/busybox"
dpkg -x "$(fetch fio "${VER[fio]}")" "$X/fio"

# (a) the hypervisor: ELF32 with a Multiboot1 header (qemu's -kernel loader
# is Multiboot1-only and rejects ELF64).
zcat "$X/xen/boot/xen-$XENVER-amd64.gz" >"$WORK/xen"
if ! head -c 5 "$WORK/xen" | od -An -tx1 | grep -q '7f 45 4c 46 01'; then
    log "xen image is not ELF32"; exit 1
fi

# (b) the kernel (dom0 and domU).
KREL=$(ls "$X/kernel/lib/modules")
cp "$X/kernel/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
KCONF=$X/kernel/boot/config-$KREL
for need in BLK_DEV_INITRD RD_GZIP DEVTMPFS XEN_PV XEN_PVH XEN_DOM0 XEN_SAVE_RESTORE HVC_XEN; do
    grep -q "^CONFIG_$need=y" "$KCONF" || { log "kernel lacks CONFIG_$need=y"; exit 1; }
done
MODROOT=$X/kernel/lib/modules/$KREL

copy_modules() { # root names...
    local root=$1; shift
    mkdir -p "$root/etc"
    python3 "$HERE/modorder.py" "$MODROOT" "$@" >"$root/etc/modules.order"
    while read -r m; do
        mkdir -p "$root/lib/modules/$(dirname "$m")"
        cp "$MODROOT/$m" "$root/lib/modules/$m"
    done <"$root/etc/modules.order"
}

# Copy the shared libraries (host paths, found by ldd) of the given ELF files
# into root, and the dynamic loader.
copy_libs() { # root files...
    local root=$1; shift
    local f l libs=""
    for f in "$@"; do
        if ldd "$f" 2>/dev/null | awk '/not found/{n++} END{exit !n}'; then
            log "libraries missing on the host for $f:"; ldd "$f" | grep 'not found' >&2; exit 1
        fi
        libs="$libs $(ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^\t\/lib/{print $1}' || true)"
    done
    for l in $(echo "$libs" | tr ' ' '\n' | sort -u); do
        local d=${l#/usr} # merged /usr: the image has usr/lib -> ../lib
        mkdir -p "$root$(dirname "$d")"
        [ -e "$root$d" ] || cp -L "$l" "$root$d"
    done
    mkdir -p "$root/lib64"
    [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
}

skeleton() { # root
    mkdir -p "$1"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,lib,lib64,usr/bin,usr/sbin,var}
    ln -s ../lib "$1/usr/lib" # merged /usr, as on the host
    cp "$X/busybox/bin/busybox" "$1/bin/busybox"
    ln -s /bin/busybox "$1/bin/sh"
}

mkcpio() { # root out.gz
    (cd "$1" && find . | LC_ALL=C sort | cpio --quiet -o -H newc | gzip -1) >"$2"
}

# The generation probe: static, no libaio. The XenStore watch logger/hook.
gcc -static -O2 -Wall -o "$WORK/xen-genprobe" "$HERE/xen-genprobe.c"
gcc -static -O2 -Wall -o "$WORK/xen-loadprobe" "$HERE/xen-loadprobe.c"
gcc -O2 -Wall -o "$WORK/xen-xswatch" "$HERE/xen-xswatch.c" -lxenstore

# (d) domU initramfs: busybox, xen-blkfront, the probes, xenstore-read (dom0
# tells a load to stop through XenStore).
DU=$WORK/domU
skeleton "$DU"
copy_modules "$DU" $DOMU_MODULES
cp "$WORK/xen-genprobe" "$DU/bin/xen-genprobe"
cp "$WORK/xen-loadprobe" "$DU/bin/xen-loadprobe"
cp "$X/xen/usr/bin/xenstore" "$DU/usr/bin/xenstore-read"
copy_libs "$DU" "$DU/usr/bin/xenstore-read"
cp "$HERE/xen-domU-init.sh" "$DU/init"
chmod 755 "$DU/init" "$DU/bin/busybox"
mkdir -p "$WORK/domU-out"
mkcpio "$DU" "$WORK/domU-out/probe.cpio.gz"
# ... and the load-scenario variant: the same plus fio and its libraries
# (Debian's fio links ceph, gluster, rdma...: the guest needs rootfstype=ramfs).
# One archive, not a concatenation.
FR=$WORK/domU-fio
cp -a "$DU" "$FR"
cp "$X/fio/usr/bin/fio" "$FR/usr/bin/fio"
copy_libs "$FR" "$FR/usr/bin/fio"
mkcpio "$FR" "$WORK/domU-out/fio.cpio.gz"
cp "$WORK/vmlinuz" "$WORK/domU-out/vmlinuz"

# (c) dom0 initramfs.
D0=$WORK/dom0
skeleton "$D0"
copy_modules "$D0" $DOM0_MODULES
mkdir -p "$D0/usr/lib/xen-$XENVER/bin" "$D0/etc/xen/scripts" "$D0/root/domU"
for b in xl xenstored xenconsoled xen-init-dom0 libxl-save-helper xenconsole; do
    cp "$X/xen/usr/lib/xen-$XENVER/bin/$b" "$D0/usr/lib/xen-$XENVER/bin/"
done
ln -s /usr/lib/xen-$XENVER/bin/xl "$D0/usr/sbin/xl" # `xl migrate-receive` is run through sh
for b in xenstore xenstore-read xenstore-write xenstore-ls xenstore-rm xenstore-watch xenstore-list xenstore-exists xenstore-chmod; do
    cp "$X/xen/usr/bin/$b" "$D0/usr/bin/$b"
done
cp "$(command -v dmsetup)" "$D0/sbin/dmsetup"
cp "$WORK/xen-xswatch" "$D0/usr/bin/xen-xswatch"
copy_libs "$D0" "$D0"/usr/lib/xen-$XENVER/bin/* "$D0/usr/bin/xenstore" "$D0/sbin/dmsetup" "$D0/usr/bin/xen-xswatch"
# pthread_cancel dlopen()s libgcc_s: without it xl aborts.
gcc_s=$(ldconfig -p | awk '/libgcc_s.so.1 .*x86-64/ && !n++ {print $NF}')
[ -n "$gcc_s" ] || { log "libgcc_s.so.1 not found"; exit 1; }
gcc_s=${gcc_s#/usr}
mkdir -p "$D0$(dirname "$gcc_s")"
cp -L "/$gcc_s" "$D0$gcc_s"
# Minimal hotplug script for kernel blkback (Debian's `block` needs bash).
cat >"$D0/etc/xen/scripts/blk-min" <<'EOF'
#!/bin/sh
# libxl runs this with XENBUS_PATH set, after the back end reached InitWait.
[ "$1" = add ] || exit 0
p=$(xenstore-read "$XENBUS_PATH/params")
xenstore-write "$XENBUS_PATH/physical-device" "$(stat -L -c %t:%T "$p")"
xenstore-write "$XENBUS_PATH/hotplug-status" connected
EOF
chmod 755 "$D0/etc/xen/scripts/blk-min"
cp "$WORK/domU-out/"* "$D0/root/domU/"
cp "$HERE/xen-dom0-init.sh" "$D0/init"
chmod 755 "$D0/init" "$D0/bin/busybox"
mkcpio "$D0" "$WORK/dom0.cpio.gz"

mkdir -p "$OUT.tmp"
mv "$WORK/xen" "$WORK/vmlinuz" "$WORK/dom0.cpio.gz" "$OUT.tmp/"
{
    echo "$KPKG ${VER[$KPKG]} xen ${VER[xen-hypervisor-$XENVER-amd64]}"
    for p in $PKGS; do echo "$p=${VER[$p]}"; done
    echo "host: $hostvers"
    echo "dom0 modules: $(tr '\n' ' ' <"$D0/etc/modules.order")"
    echo "domU modules: $(tr '\n' ' ' <"$DU/etc/modules.order")"
    echo "sizes: dom0.cpio.gz $(du -h "$OUT.tmp/dom0.cpio.gz" | cut -f1) probe $(du -h "$WORK/domU-out/probe.cpio.gz" | cut -f1) fio $(du -h "$WORK/domU-out/fio.cpio.gz" | cut -f1)"
} >"$OUT.tmp/INFO"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
# Older builds (other input hashes) are only disk space now.
for old in "$CACHE"/xen-*; do
    [ "$old" = "$OUT" ] || [ ! -d "$old" ] || case "$old" in *.tmp) ;; *) rm -rf "$old" ;; esac
done
log "built $OUT: $(tail -1 "$OUT/INFO")"
echo "$OUT"
