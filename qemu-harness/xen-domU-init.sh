#!/bin/busybox sh
# /init of the real-Xen harness domU (busybox + xen-blkfront + xen-genprobe +
# xen-loadprobe + xenstore-read, and fio in the fio variant). Started by
# dom0's `xl create`; its console is hvc0, which xenconsoled logs to
# /var/log/xen/console/guest-<name>.log in dom0, where xen-dom0-init.sh reads
# and relays it.
#
# Kernel command line words xp.KEY=VALUE:
#   xp.mode=probe   run xen-genprobe on /dev/xvda (xp.settle, xp.gens,
#                   xp.blocks, xp.stride_kb, xp.read_ms)
#   xp.mode=fio     fio randwrite with crc32c verification over the disk
#                   (or xp.fio_offset / xp.fio_size of it; libaio, direct,
#                   iodepth xp.iodepth) in rounds until dom0 writes
#                   data/xh-stop in this domain's XenStore directory, then a
#                   final verify read
#   xp.mode=load    xen-loadprobe (xp.blocks, xp.depth, xp.time, xp.rate) until
#                   data/xh-stop; with xp.fio=1 (fio image) the fio rounds
#                   above run beside it, on the disk from xp.fio_offset on
#   xp.mode=features  1 MiB O_DIRECT writes/reads (indirect segments),
#                   blkdiscard, a buffered write + fsync (flush), the load
#                   probe pinned to each CPU (multi-queue); sysfs queue limits
#   xp.mode=perf    fio jobs (xp.perf_jobs, xp.perf_s), terse results
#   xp.mode=idle    nothing (teardown)
#   xp.blkfront=k=v,k=v  xen-blkfront module parameters (given to insmod)
# `xl shutdown` works: /sbin/poweroff (run by the kernel's orderly_poweroff)
# is `poweroff -f`, and the kernel's shutdown still closes blkfront's vbds.
# Every line dom0 parses starts with DOMU-, PROBE, CORRUPTION or LOAD-.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

# xl shutdown: the kernel runs /sbin/poweroff; busybox's plain poweroff
# signals PID 1, which this shell ignores, so power off directly.
rm -f /sbin/poweroff
cat >/sbin/poweroff <<'EOF'
#!/bin/sh
echo "DOMU-POWEROFF uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
exec /bin/busybox poweroff -f
EOF
chmod 755 /sbin/poweroff

for word in $(cat /proc/cmdline); do
    case "$word" in
    xp.*=*)
        key=${word%%=*}; key=${key#xp.}; val=${word#*=}
        eval "xp_$key=\$val"
        ;;
    esac
done

for m in $(cat /etc/modules.order); do
    args=""
    case "$m" in */xen-blkfront.ko) args=$(echo "${xp_blkfront:-}" | tr ',' ' ') ;; esac
    insmod "/lib/modules/$m" $args || echo "DOMU-WARN insmod $m $args failed"
done
if [ -n "${xp_blkfront:-}" ]; then
    echo "DOMU-BLKFRONT $(for p in /sys/module/xen_blkfront/parameters/*; do printf '%s=%s ' "${p##*/}" "$(cat "$p")"; done)"
fi

mode=${xp_mode:-probe}
dev=/dev/xvda
echo "DOMU-BOOTED mode=$mode uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(nproc)"
i=0
while [ ! -b $dev ] && [ $i -lt 200 ]; do i=$((i + 1)); sleep 0.1; done
[ -b $dev ] && echo "DOMU-DISK $dev bytes=$(blockdev --getsize64 $dev)" || echo "DOMU-ERROR no $dev"

idle() { # dom0 destroys or shuts down the domain when it has what it needs
    echo "DOMU-IDLE"
    while :; do sleep 3600; done
}
stop_watch() { # /tmp/xh-stop appears once dom0 wrote data/xh-stop
    (while ! xenstore-read data/xh-stop >/dev/null 2>&1; do sleep 1; done; touch /tmp/xh-stop) &
}
fio_rounds() { # DOMU-FIO-ROUND/-STOP/-FINAL lines
    depth=${xp_iodepth:-8}
    maxrounds=${xp_rounds:-20}
    region="--offset=${xp_fio_offset:-0} --size=${xp_fio_size:-100%}"
    r=0; errs=0; fail=0
    while [ ! -e /tmp/xh-stop ] && [ $r -lt "$maxrounds" ]; do
        r=$((r + 1))
        echo "DOMU-FIO-ROUND $r start uptime=$(cut -d' ' -f1 /proc/uptime)"
        fio --name=load --filename=$dev --rw=randwrite --bs=4k $region --direct=1 \
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
    fio --name=final --filename=$dev --rw=read --bs=4k $region --direct=1 --ioengine=libaio \
        --iodepth="$depth" --verify=crc32c --output-format=terse --terse-version=3 \
        >/tmp/final.out 2>/tmp/final.err
    rc=$?
    n=$(grep -c -E 'verify:|bad magic|crc32c|err=[ ]*[1-9]' /tmp/final.err)
    grep -E 'verify|bad magic|crc32c|err=|error' /tmp/final.err | head -10 | sed 's/^/DOMU-FIO-ERR final: /'
    [ $rc -ne 0 ] && [ "$n" -eq 0 ] && n=1
    echo "DOMU-FIO-FINAL rc=$rc verify_errors=$n rounds=$r failed_rounds=$fail"
}

case "$mode" in
probe)
    xen-genprobe $dev settle=${xp_settle:-60} gens=${xp_gens:-5} blocks=${xp_blocks:-8} \
        stride_kb=${xp_stride_kb:-1024} read_ms=${xp_read_ms:-100}
    echo "DOMU-PROBE-EXIT rc=$?"
    idle
    ;;
fio)
    # Rounds of 4k randwrite with crc32c headers (libaio, O_DIRECT, iodepth
    # xp.iodepth), each re-reading recent writes (verify_backlog) and its
    # region at its end (do_verify), until dom0 writes data/xh-stop into this
    # domain's XenStore directory; then a final verify read.
    stop_watch
    fio_rounds
    idle
    ;;
load)
    # The load scenario: xen-loadprobe (and, with xp.fio=1, the fio rounds
    # on the disk from xp.fio_offset on) until dom0 says stop.
    stop_watch
    FIOPID=""
    if [ "${xp_fio:-0}" = 1 ]; then
        if command -v fio >/dev/null; then
            fio_rounds &
            FIOPID=$!
        else
            echo "DOMU-ERROR xp.fio=1 but no fio in this image"
        fi
    fi
    xen-loadprobe $dev blocks=${xp_blocks:-4096} depth=${xp_depth:-16} time=${xp_time:-900} \
        stop=/tmp/xh-stop status_s=${xp_status_s:-5} rate=${xp_rate:-0} tag=DOMU-LOAD
    echo "DOMU-LOAD-EXIT rc=$?"
    [ -n "$FIOPID" ] && wait "$FIOPID"
    echo "DOMU-LOAD-DONE"
    idle
    ;;
features)
    q=/sys/block/xvda/queue
    echo "DOMU-FEAT-SYSFS max_segments=$(cat $q/max_segments) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) max_sectors_kb=$(cat $q/max_sectors_kb) discard_max_bytes=$(cat $q/discard_max_bytes) discard_granularity=$(cat $q/discard_granularity) write_cache=$(tr ' ' _ <$q/write_cache) fua=$(cat $q/fua) hw_queues=$(ls /sys/block/xvda/mq | wc -l) nr_requests=$(cat $q/nr_requests) cpus=$(nproc)"
    # Indirect segments: 1 MiB O_DIRECT writes and reads (4 of each).
    dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
    dd if=/tmp/pat of=$dev bs=1M count=4 seek=4 oflag=direct conv=notrunc 2>/tmp/dd.err; wrc=$?
    dd if=$dev of=/tmp/back bs=1M count=4 skip=4 iflag=direct 2>>/tmp/dd.err; rrc=$?
    cmp -s /tmp/pat /tmp/back && c=ok || c=bad
    echo "DOMU-FEAT indirect write_rc=$wrc read_rc=$rrc cmp=$c"
    # Discard: write 4 MiB at 16 MiB, blkdiscard it, read it back.
    dd if=/tmp/pat of=$dev bs=1M count=4 seek=16 oflag=direct conv=notrunc 2>>/tmp/dd.err
    blkdiscard -o $((16 << 20)) -l $((4 << 20)) $dev 2>/tmp/discard.err; drc=$?
    nz=$(dd if=$dev bs=1M count=4 skip=16 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
    echo "DOMU-FEAT discard rc=$drc nonzero_bytes_after=$nz $(head -c 200 /tmp/discard.err | tr '\n' ' ')"
    # Flush: a buffered write, then fsync of the block device, then sync.
    dd if=/tmp/pat of=$dev bs=64k count=16 seek=384 conv=fsync,notrunc 2>>/tmp/dd.err; frc=$?
    sync
    echo "DOMU-FEAT flush rc=$frc"
    # Multi-queue: the load probe pinned to each CPU, on disjoint regions.
    c=0; pids=""
    while [ $c -lt "$(nproc)" ]; do
        taskset $((1 << c)) xen-loadprobe $dev blocks=1024 offset_mb=$((32 + 8 * c)) time=${xp_mq_s:-8} \
            status_s=4 tag=DOMU-FEAT-CPU$c >/tmp/lp$c.out 2>&1 &
        pids="$pids $!"; c=$((c + 1))
    done
    wait $pids
    mq=""; c=0
    while [ $c -lt "$(nproc)" ]; do
        cat /tmp/lp$c.out
        r=$(grep -o 'LOAD-RESULT [A-Z]*' /tmp/lp$c.out | cut -d' ' -f2)
        cpu=$(grep -m1 -o 'cpu=[0-9]*' /tmp/lp$c.out | cut -d= -f2)
        ops=$(grep -o 'LOAD-RESULT.* ops=[0-9]*' /tmp/lp$c.out | grep -o 'ops=[0-9]*' | cut -d= -f2)
        mq="$mq${mq:+,}cpu$c:${r:-none}:ran_on_$cpu:ops_$ops"
        c=$((c + 1))
    done
    echo "DOMU-FEAT mq $mq"
    echo "DOMU-FEAT dd: $(head -c 300 /tmp/dd.err | tr '\n' ' ')"
    echo "DOMU-FEAT-DONE"
    idle
    ;;
perf)
    # Jobs name:rw:bs:iodepth, xp.perf_s seconds each; DOMU-PERF lines.
    for j in $(echo "${xp_perf_jobs:-randwrite4k:randwrite:4k:16,randread4k:randread:4k:16,seqwrite1m:write:1m:16}" | tr ',' ' '); do
        name=$(echo "$j" | cut -d: -f1); rw=$(echo "$j" | cut -d: -f2)
        bs=$(echo "$j" | cut -d: -f3); qd=$(echo "$j" | cut -d: -f4)
        fio --name="$name" --filename=$dev --rw="$rw" --bs="$bs" --iodepth="$qd" --direct=1 \
            --ioengine=libaio --time_based --runtime="${xp_perf_s:-15}" --size=100% --randrepeat=0 \
            --output-format=terse --terse-version=3 >/tmp/perf.out 2>/tmp/perf.err
        rc=$?
        # terse v3: field 7 read KiB/s, 8 read IOPS; 48 write KiB/s, 49 write IOPS
        if [ -s /tmp/perf.out ]; then
            awk -F';' -v n="$name" -v rc=$rc '/;/{printf "DOMU-PERF %s rc=%s read_iops=%s read_kibs=%s write_iops=%s write_kibs=%s\n", n, rc, $8, $7, $49, $48}' /tmp/perf.out
        else
            echo "DOMU-PERF $name rc=$rc error=$(head -c 200 /tmp/perf.err | tr '\n ' '__')"
        fi
    done
    echo "DOMU-PERF-DONE"
    idle
    ;;
idle)
    idle
    ;;
*)
    echo "DOMU-ERROR unknown mode $mode"
    idle
    ;;
esac
