#!/bin/busybox sh
# /init of the harness guest (busybox + fio in an initramfs, no root disk).
#
# The workload comes from the kernel command line (hw.KEY=VALUE words). Every
# line the host parses starts with "HARNESS-"; everything goes to the serial
# console (ttyS0), which the harness reads through a socket.
#
#   hw.mode=probe                      print HARNESS-PROBE-OK and power off
#   hw.mode=fio                        rounds of whole-disk randwrite with
#                                      crc32c verification until the host
#                                      types "stop" on the console, then a
#                                      final whole-disk read+verify pass
#                                      (round N's blocks carry the stamp
#                                      0x5247RRRR, RRRR = N, after fio's
#                                      crc32c header: the host checks that
#                                      every block holds the last round's)
#   hw.mode=writer hw.pattern=0x..     write the first hw.region bytes with a
#                                      4-byte pattern, read them back and
#                                      verify; with hw.forever=1 keep
#                                      rewriting them afterwards; with
#                                      hw.wait=1 wait for "go" on the console
#                                      before writing
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
set -o pipefail
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || echo "HARNESS-WARN insmod $m failed"
done

# hw.* words of the kernel command line become shell variables hw_KEY.
for word in $(cat /proc/cmdline); do
    case "$word" in
    hw.*=*)
        key=${word%%=*}; key=${key#hw.}; val=${word#*=}
        eval "hw_$key=\$val"
        ;;
    esac
done
mode=${hw_mode:-probe}
dev=${hw_dev:-/dev/vda}

echo "HARNESS-BOOTED mode=$mode uptime=$(cut -d' ' -f1 /proc/uptime)"

finish() {
    echo "HARNESS-DONE"
    sync
    poweroff -f
}

wait_disk() {
    i=0
    while [ ! -b "$dev" ]; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            echo "HARNESS-RESULT FAIL no disk $dev"
            finish
        fi
        sleep 0.1
    done
    echo "HARNESS-DISK $dev bytes=$(blockdev --getsize64 "$dev")"
}

# Print fio's error lines so the host log keeps them, and count verify errors.
report_errors() { # file label
    n=$(grep -c -E 'verify:|bad magic|crc32c|err=[ ]*[1-9]' "$1")
    grep -E 'verify:|bad magic|crc32c|err=|error' "$1" | head -20 | sed "s/^/HARNESS-FIO-ERR $2: /"
    echo "$n"
}

case "$mode" in
probe)
    echo "HARNESS-PROBE-OK"
    finish
    ;;
fio)
    wait_disk
    bs=${hw_bs:-4k}
    depth=${hw_iodepth:-4}
    backlog=${hw_backlog:-256}
    maxrounds=${hw_rounds:-1000}
    # The host types "stop" on the console when it is done migrating.
    (while read -r line; do
        case "$line" in *stop*) touch /tmp/stop; echo "HARNESS-STOP-SEEN";; esac
    done </dev/ttyS0) &
    round=0
    errors=0
    while [ ! -e /tmp/stop ] && [ $round -lt "$maxrounds" ]; do
        round=$((round + 1))
        echo "HARNESS-ROUND-START $round"
        # Whole disk, random order, every block once per round; each block
        # carries a crc32c header; verify_backlog re-reads recent writes while
        # writing, do_verify re-reads everything at the end of the round.
        # The round's stamp fills each block after the crc32c header, so a
        # block reverted to an earlier round's (valid) data shows its round.
        stamp=$(printf '0x5247%04x' "$round")
        echo "HARNESS-ROUND-STAMP $round $stamp"
        fio --name=load --filename="$dev" --rw=randwrite --bs="$bs" --size=100% \
            --direct=1 --ioengine=libaio --iodepth="$depth" --randseed="$round" \
            --verify=crc32c --verify_pattern="$stamp" --verify_backlog="$backlog" --do_verify=1 \
            --status-interval=1 --output-format=terse --terse-version=3 \
            2>/tmp/fio.err | sed 's/^/HARNESS-FIO /'
        rc=$?
        e=$(report_errors /tmp/fio.err "round$round")
        if [ $rc -ne 0 ] && [ "$e" -eq 0 ]; then e=1; fi
        errors=$((errors + e))
        echo "HARNESS-ROUND-END $round verify_errors=$e"
        if [ "$e" -ne 0 ]; then break; fi
    done
    echo "HARNESS-FINAL-VERIFY-START rounds=$round"
    fio --name=final --filename="$dev" --rw=read --bs="$bs" --size=100% \
        --direct=1 --ioengine=libaio --iodepth="$depth" --verify=crc32c \
        --output-format=terse --terse-version=3 >/tmp/final.out 2>/tmp/final.err
    frc=$?
    fe=$(report_errors /tmp/final.err final)
    if [ $frc -ne 0 ] && [ "$fe" -eq 0 ]; then fe=1; fi
    sed 's/^/HARNESS-FIO-FINAL /' /tmp/final.out
    echo "HARNESS-FINAL-VERIFY rc=$frc errors=$fe"
    if [ $round -ge 1 ] && [ $errors -eq 0 ] && [ "$fe" -eq 0 ]; then
        echo "HARNESS-RESULT PASS rounds=$round"
    else
        echo "HARNESS-RESULT FAIL rounds=$round round_errors=$errors final_errors=$fe"
    fi
    finish
    ;;
writer)
    wait_disk
    region=${hw_region:-1M}
    pat=${hw_pattern:?hw.pattern missing}
    if [ "${hw_wait:-0}" = 1 ]; then
        echo "HARNESS-WRITER-WAITING"
        while read -r line; do
            case "$line" in *go*) break ;; esac
        done </dev/ttyS0
        echo "HARNESS-WRITER-GO"
    fi
    fio --name=write --filename="$dev" --rw=write --bs=4k --size="$region" \
        --direct=1 --ioengine=psync --verify=pattern --verify_pattern="$pat" \
        --do_verify=1 --output-format=terse >/tmp/w.out 2>/tmp/w.err
    rc=$?
    e=$(report_errors /tmp/w.err writer)
    if [ $rc -eq 0 ] && [ "$e" -eq 0 ]; then
        echo "HARNESS-WRITER-VERIFIED pattern=$pat"
    else
        echo "HARNESS-RESULT FAIL writer rc=$rc errors=$e"
        finish
    fi
    if [ "${hw_forever:-0}" = 1 ]; then
        echo "HARNESS-WRITER-LOOPING pattern=$pat"
        # Keep rewriting the same blocks (with several writes in flight) so
        # the host can catch writes in flight when it cuts this writer off.
        while :; do
            fio --name=loop --filename="$dev" --rw=write --bs=4k --size="$region" \
                --direct=1 --ioengine=libaio --iodepth=8 --verify=pattern \
                --verify_pattern="$pat" --do_verify=0 --loops=100 \
                --output-format=terse >/dev/null 2>&1
        done
    fi
    finish
    ;;
*)
    echo "HARNESS-RESULT FAIL unknown mode $mode"
    finish
    ;;
esac
