#!/bin/busybox sh
# /init of the real-Xen harness domU (busybox + xen-blkfront + xen-genprobe,
# and fio in the load variant). Started by dom0's `xl create`; its console is
# hvc0, which xenconsoled logs to /var/log/xen/console/guest-<name>.log in
# dom0, where xen-dom0-init.sh reads and relays it.
#
# Kernel command line words xp.KEY=VALUE:
#   xp.mode=probe   run xen-genprobe on /dev/xvda (xp.settle, xp.gens,
#                   xp.blocks, xp.stride_kb, xp.read_ms)
#   xp.mode=fio     fio randwrite with crc32c verification over the whole
#                   disk (libaio, direct, iodepth xp.iodepth) in rounds until
#                   dom0 writes data/xh-stop in this domain's XenStore
#                   directory, then a final whole-disk verify read
# Every line dom0 parses starts with DOMU- or PROBE / CORRUPTION.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || echo "DOMU-WARN insmod $m failed"
done

for word in $(cat /proc/cmdline); do
    case "$word" in
    xp.*=*)
        key=${word%%=*}; key=${key#xp.}; val=${word#*=}
        eval "xp_$key=\$val"
        ;;
    esac
done
mode=${xp_mode:-probe}
dev=/dev/xvda
echo "DOMU-BOOTED mode=$mode uptime=$(cut -d' ' -f1 /proc/uptime)"
i=0
while [ ! -b $dev ] && [ $i -lt 200 ]; do i=$((i + 1)); sleep 0.1; done
[ -b $dev ] && echo "DOMU-DISK $dev bytes=$(blockdev --getsize64 $dev)" || echo "DOMU-ERROR no $dev"

idle() { # dom0 destroys the domain when it has what it needs
    echo "DOMU-IDLE"
    while :; do sleep 3600; done
}

case "$mode" in
probe)
    xen-genprobe $dev settle=${xp_settle:-60} gens=${xp_gens:-5} blocks=${xp_blocks:-8} \
        stride_kb=${xp_stride_kb:-1024} read_ms=${xp_read_ms:-100}
    echo "DOMU-PROBE-EXIT rc=$?"
    idle
    ;;
fio)
    # The load scenario: rounds of whole-disk 4k randwrite with crc32c
    # headers (libaio, O_DIRECT, iodepth xp.iodepth), each re-reading recent
    # writes (verify_backlog) and the whole disk at its end (do_verify), until
    # dom0 writes data/xh-stop into this domain's XenStore directory (after
    # its save/restores and migrations); then a final whole-disk verify read.
    depth=${xp_iodepth:-8}
    maxrounds=${xp_rounds:-20}
    r=0; errs=0; fail=0
    while ! xenstore-read data/xh-stop >/dev/null 2>&1 && [ $r -lt "$maxrounds" ]; do
        r=$((r + 1))
        echo "DOMU-FIO-ROUND $r start uptime=$(cut -d' ' -f1 /proc/uptime)"
        fio --name=load --filename=$dev --rw=randwrite --bs=4k --size=100% --direct=1 \
            --ioengine=libaio --iodepth="$depth" --randseed="$r" --verify=crc32c \
            --verify_backlog=256 --do_verify=1 --output-format=terse --terse-version=3 \
            >/tmp/fio.out 2>/tmp/fio.err
        rc=$?
        n=$(grep -c -E 'verify:|bad magic|crc32c|err=[ ]*[1-9]' /tmp/fio.err)
        grep -E 'verify|bad magic|crc32c|err=|error' /tmp/fio.err | head -10 | sed "s/^/DOMU-FIO-ERR round $r: /"
        [ $rc -ne 0 ] && [ "$n" -eq 0 ] && n=1
        errs=$((errs + n)); [ "$n" -ne 0 ] && fail=$((fail + 1))
        echo "DOMU-FIO-ROUND $r end rc=$rc verify_errors=$n uptime=$(cut -d' ' -f1 /proc/uptime)"
    done
    echo "DOMU-FIO-STOP rounds=$r"
    fio --name=final --filename=$dev --rw=read --bs=4k --size=100% --direct=1 --ioengine=libaio \
        --iodepth="$depth" --verify=crc32c --output-format=terse --terse-version=3 \
        >/tmp/final.out 2>/tmp/final.err
    rc=$?
    n=$(grep -c -E 'verify:|bad magic|crc32c|err=[ ]*[1-9]' /tmp/final.err)
    grep -E 'verify|bad magic|crc32c|err=|error' /tmp/final.err | head -10 | sed 's/^/DOMU-FIO-ERR final: /'
    [ $rc -ne 0 ] && [ "$n" -eq 0 ] && n=1
    echo "DOMU-FIO-FINAL rc=$rc verify_errors=$n rounds=$r failed_rounds=$fail"
    idle
    ;;
*)
    echo "DOMU-ERROR unknown mode $mode"
    idle
    ;;
esac
