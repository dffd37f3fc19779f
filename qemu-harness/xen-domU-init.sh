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
#                   dom0 writes "stop" to xenstore (data/xh-stop), then a
#                   final whole-disk verify read
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
    # The load scenario: rounds of whole-disk randwrite + verify while dom0
    # saves/restores and migrates the domain; dom0 ends the rounds by
    # creating /tmp/stop... it cannot: the domU has no dom0 channel but its
    # console and disk, so the rounds are counted: xp.rounds, each bounded
    # by xp.runtime seconds (time_based off: fixed-bs full-disk writes keep
    # fio's verify headers exact).
    rounds=${xp_rounds:-3}
    depth=${xp_iodepth:-8}
    r=1; fail=0
    while [ $r -le $rounds ]; do
        echo "DOMU-FIO-ROUND $r start uptime=$(cut -d' ' -f1 /proc/uptime)"
        fio --name=load --filename=$dev --ioengine=libaio --direct=1 --iodepth=$depth \
            --rw=randwrite --bs=4k --verify=crc32c --do_verify=1 --verify_backlog=256 \
            --verify_fatal=0 --randrepeat=0 --output-format=terse --terse-version=3 \
            >/tmp/fio-$r.out 2>/tmp/fio-$r.err
        rc=$?
        nerr=$(grep -c -E 'verify:|bad magic|crc32c' /tmp/fio-$r.err)
        grep -E 'verify|bad magic|crc32c|error' /tmp/fio-$r.err | head -10 | sed "s/^/DOMU-FIO-ERR round $r: /"
        echo "DOMU-FIO-ROUND $r end rc=$rc verify_errors=$nerr uptime=$(cut -d' ' -f1 /proc/uptime)"
        [ $rc -eq 0 ] && [ "$nerr" -eq 0 ] || fail=$((fail + 1))
        r=$((r + 1))
    done
    fio --name=final --filename=$dev --ioengine=libaio --direct=1 --iodepth=$depth --rw=read --bs=4k \
        --verify=crc32c --verify_fatal=0 --verify_only=1 --randrepeat=0 >/tmp/fio-final.out 2>/tmp/fio-final.err
    rc=$?
    nerr=$(grep -c -E 'verify:|bad magic|crc32c' /tmp/fio-final.err)
    grep -E 'verify|bad magic|crc32c|error' /tmp/fio-final.err | head -10 | sed 's/^/DOMU-FIO-ERR final: /'
    echo "DOMU-FIO-FINAL rc=$rc verify_errors=$nerr failed_rounds=$fail"
    idle
    ;;
*)
    echo "DOMU-ERROR unknown mode $mode"
    idle
    ;;
esac
