#!/bin/sh
# /payload/run.sh of the sanlock guest (qemu-harness/sanlock.sh puts it
# there). LIO exports one fileio LU through two tcm_loop targets: /dev/sda
# is host A's path to it, /dev/sdb host B's. The first 8 MiB are the lease
# area (lockspace "blkshim" at 0, disk vm1's paxos lease at 1 MiB), reached
# through dm-linear devices /dev/mapper/leaseA (over sda) and leaseB (over
# sdb) so that A alone can be cut off from the leases (its table swapped
# for dm-error); 16 MiB on is "vm1's data", written by the writers.
#
# Two hosts in one guest: two sanlock daemons, each with its own
# SANLOCK_RUN_DIR (socket, pid lock; the client library reads the same
# variable to find its daemon) and its own host id in the same lockspace,
# sharing one wdmd (one /dev/watchdog: softdog). A mount namespace per
# daemon would do too; the run dir is simpler. Everything is driven
# through `blkshim lease` (SanlockFence), with io_timeout 3 s: renewal 6 s,
# kill after 24 s without renewal, host_dead 84 s.
#
# Not io_timeout 1 (2/8/68 s): wdmd 3.8.5 tests its clients every 10 s and
# closes /dev/watchdog uncleanly (the watchdog then fires 60 s later) as
# soon as a client's expiry (last renewal + 8 x io_timeout) is less than
# ~10 s away. With io_timeout 1 that is always the case (8 s), so the
# watchdog fires ~60 s after the lockspaces are joined whatever happens
# (seen in this guest: "/dev/watchdog0 closed unclean" at the first test,
# "softdog: Triggered" 60 s later, with both hosts healthy). io_timeout 3
# keeps the expiry >= 18 s ahead of a renewing host.
#
# softdog is loaded with soft_noboot=1 (SOFTDOG_NOBOOT=0 to reset for
# real): if wdmd let it fire, the kernel logs "softdog: Triggered" and the
# run reports watchdog-quiet FAIL instead of vanishing in a reset.
#
# Prints HOSTSIDE-RESULT <step> PASS|FAIL <evidence> and SANLOCK-TIME lines.
set -u
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export DM_DISABLE_UDEV=1
P=/payload
BS=$P/blkshim
T=/sys/kernel/config/target
NOBOOT=${SOFTDOG_NOBOOT:-1}
# sanlock.sh may set IO_TIMEOUT (SANLOCK_IO_TIMEOUT on the host) here.
[ -f $P/env ] && . $P/env
IO_TIMEOUT=${IO_TIMEOUT:-3}

result() { echo "HOSTSIDE-RESULT $1 $2 $3"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
oneline() { tr '\n' ' ' <"$1" | cut -c1-600; }

# wait_for FILE PATTERN SECONDS: until FILE contains PATTERN (bounded).
wait_for() {
    n=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        n=$((n + 1))
        [ $n -gt $(($3 * 10)) ] && return 1
        sleep 0.1
    done
}

# --- LIO: as hostside-guest.sh ------------------------------------------------
setup_lio() {
    mount -t configfs configfs /sys/kernel/config 2>/dev/null || true
    [ -d "$T" ] || { echo "no $T"; return 1; }
    dd if=/dev/zero of=/tmp/shared.img bs=1M count=64 2>/dev/null || return 1
    mkdir -p $T/core/fileio_0/disk0 || return 1
    echo "fd_dev_name=/tmp/shared.img,fd_dev_size=67108864" >$T/core/fileio_0/disk0/control || return 1
    echo 1 >$T/core/fileio_0/disk0/enable || return 1
    for i in 1 2; do
        tpg=$T/loopback/naa.5001405000000a0$i/tpgt_1
        mkdir -p $tpg || return 1
        echo naa.5001405000000b0$i >$tpg/nexus || return 1
        mkdir $tpg/lun/lun_0 || return 1
        ln -s $T/core/fileio_0/disk0 $tpg/lun/lun_0/disk0 || return 1
    done
    for d in /dev/sda /dev/sdb; do
        n=0
        while [ ! -b $d ]; do n=$((n + 1)); [ $n -gt 300 ] && return 1; sleep 0.1; done
    done
}
if setup_lio 2>/tmp/lio.err; then
    result lio-setup PASS "fileio 64MiB via 2 tcm_loop nexuses: sda, sdb"
else
    result lio-setup FAIL "$(oneline /tmp/lio.err)"
    exit 1
fi

# --- modules: softdog (+ watchdog core), dm-mod ------------------------------------
ok=1
for m in $(cat $P/modules/order); do
    name=${m%.ko}
    [ -d /sys/module/$(echo $name | tr - _) ] && continue
    if [ "$name" = softdog ]; then
        insmod $P/modules/$m soft_noboot=$NOBOOT 2>>/tmp/mod.err || ok=0
    else
        insmod $P/modules/$m 2>>/tmp/mod.err || ok=0
    fi
done
if [ $ok = 1 ] && [ -c /dev/watchdog ] && [ -c /dev/mapper/control ]; then
    result modules PASS "$(cat $P/modules/order | tr '\n' ' ')(softdog soft_noboot=$NOBOOT) /dev/watchdog /dev/mapper/control"
else
    result modules FAIL "$(oneline /tmp/mod.err) $(ls /dev/watchdog* /dev/mapper 2>&1 | tr '\n' ' ')"
    exit 1
fi

# --- the two hosts' paths to the lease area ------------------------------------------
LEASE_SECTORS=16384 # 8 MiB
DATA_SECTOR=32768   # 16 MiB: vm1's "data", where writers leave their marks
if dmsetup create leaseA --table "0 $LEASE_SECTORS linear /dev/sda 0" 2>/tmp/dm.err &&
    dmsetup create leaseB --table "0 $LEASE_SECTORS linear /dev/sdb 0" 2>>/tmp/dm.err &&
    [ -b /dev/mapper/leaseA ] && [ -b /dev/mapper/leaseB ]; then
    result dm-paths PASS "leaseA=$(dmsetup table leaseA) leaseB=$(dmsetup table leaseB)"
else
    result dm-paths FAIL "$(oneline /tmp/dm.err) $(ls -l /dev/mapper 2>&1 | tr '\n' ' ')"
    exit 1
fi

# --- wdmd and two sanlock daemons ----------------------------------------------------
mkdir -p /run/wdmd /run/sanlock-a /run/sanlock-b /var/run /var/log /dev/shm
# wdmd keeps its state in POSIX shared memory.
mount -t tmpfs -o size=16m shm /dev/shm 2>/dev/null || true
wdmd -D -G sanlock >/tmp/wdmd.log 2>&1 &
WDMD=$!
if wait_for /proc/net/unix wdmd.sock 20; then
    result wdmd PASS "pid $WDMD, $(grep -m1 -i 'watchdog' /tmp/wdmd.log | cut -c1-160)"
else
    result wdmd FAIL "$(oneline /tmp/wdmd.log)"
    exit 1
fi
for h in a b; do
    SANLOCK_RUN_DIR=/run/sanlock-$h sanlock daemon -D -U root -G sanlock -e host-$h -L -1 -S -1 \
        >/tmp/sanlock-$h.log 2>&1 &
    eval "SL_$h=\$!"
done
if wait_for /proc/net/unix sanlock-a/sanlock.sock 20 && wait_for /proc/net/unix sanlock-b/sanlock.sock 20; then
    result daemons PASS "sanlock A pid $SL_a (/run/sanlock-a), B pid $SL_b (/run/sanlock-b)"
else
    result daemons FAIL "A: $(oneline /tmp/sanlock-a.log) B: $(oneline /tmp/sanlock-b.log)"
    exit 1
fi

COMMON="--sanlock-lockspace blkshim --sanlock-resource vm1=1M --sanlock-io-timeout $IO_TIMEOUT"
lease_a() { SANLOCK_RUN_DIR=/run/sanlock-a RUST_LOG=info $BS lease $COMMON --sanlock-host-id 1 --sanlock-path /dev/mapper/leaseA "$@"; }
lease_b() { SANLOCK_RUN_DIR=/run/sanlock-b RUST_LOG=info $BS lease $COMMON --sanlock-host-id 2 --sanlock-path /dev/mapper/leaseB "$@"; }

# --- init through A's path, read back through B's ------------------------------------------
if lease_a init >/tmp/init.out 2>&1 && lease_b read --disk vm1 >/tmp/read0.out 2>&1 &&
    grep -q '"lver":0' /tmp/read0.out; then
    result init PASS "$(grep -o '{"command":"init.*' /tmp/init.out | cut -c1-300) | via B: $(grep -o '{.*' /tmp/read0.out)"
else
    result init FAIL "$(oneline /tmp/init.out) $(oneline /tmp/read0.out)"
    exit 1
fi

# --- A takes vm1 at epoch 1 and writes until it is killed --------------------------------------
WRITER='i=0; while :; do i=$((i + 1)); echo "A epoch 1 write $i at $(cut -d" " -f1 /proc/uptime)" | dd of=/dev/sda bs=512 seek='$DATA_SECTOR' count=1 conv=sync,notrunc,fsync 2>/dev/null; sleep 0.2; done'
(
    lease_a acquire --disk vm1 --epoch 1 -- /bin/sh -c "$WRITER" >/tmp/a.out 2>/tmp/a.err
    echo "$? $(now)" >/tmp/a.exit
) &
if wait_for /tmp/a.out '"command":"acquire".*"ok":true' 90 && grep -q '"lver":1' /tmp/a.out; then
    result a-acquires PASS "$(grep '"command":"acquire"' /tmp/a.out | cut -c1-400)"
else
    result a-acquires FAIL "$(oneline /tmp/a.out) $(oneline /tmp/a.err)"
    exit 1
fi
APID=$(grep -o '"pid":[0-9]*' /tmp/a.out | cut -d: -f2)

# --- B: refused while A is alive, and refused as stale below the lease's lver --------------------
lease_b acquire --disk vm1 --epoch 2 >/tmp/b0.out 2>/tmp/b0.err
rc=$?
if [ $rc != 0 ] && grep -q '"kind":"lease-busy"' /tmp/b0.out; then
    result b-refused-live PASS "exit $rc: $(grep '"command":"acquire"' /tmp/b0.out | cut -c1-500)"
else
    result b-refused-live FAIL "exit $rc: $(oneline /tmp/b0.out) $(oneline /tmp/b0.err)"
fi
lease_b acquire --disk vm1 --epoch 1 >/tmp/b1.out 2>/tmp/b1.err
rc=$?
if [ $rc != 0 ] && grep -q '"kind":"held-by-newer"' /tmp/b1.out; then
    result b-stale-epoch-refused PASS "exit $rc: $(grep '"command":"acquire"' /tmp/b1.out | cut -c1-400)"
else
    result b-stale-epoch-refused FAIL "exit $rc: $(oneline /tmp/b1.out) $(oneline /tmp/b1.err)"
fi

# --- cut A off from the lease area --------------------------------------------------------------
# B starts asking right away; it is refused while A still counts as alive,
# then its acquire blocks in the daemon until A's host_dead_seconds passed.
T_CUT=$(now)
if dmsetup suspend leaseA && dmsetup load leaseA --table "0 $LEASE_SECTORS error" && dmsetup resume leaseA; then
    result cut-off PASS "at uptime $T_CUT: leaseA is now '$(dmsetup table leaseA)' (A's lease I/O fails; its data path sda is untouched)"
else
    result cut-off FAIL "dmsetup failed"
fi
READER="dd if=/dev/sdb bs=512 skip=$DATA_SECTOR count=1 2>/dev/null | tr -d '\\000'; echo; echo 'B epoch 2 write' | dd of=/dev/sdb bs=512 seek=$DATA_SECTOR count=1 conv=sync,notrunc,fsync 2>/dev/null"
T_B=$(now)
(
    lease_b acquire --disk vm1 --epoch 2 --retry-busy-for 200 -- /bin/sh -c "$READER" >/tmp/b.out 2>/tmp/b.err
    echo "$? $(now)" >/tmp/b.exit
) &

# --- A's daemon kills A's writer ------------------------------------------------------------------
if wait_for /tmp/a.exit . 60; then
    set -- $(cat /tmp/a.exit)
    A_RC=$1 A_T=$2
    KILL_S=$(awk -v a="$T_CUT" -v b="$A_T" 'BEGIN{printf "%.1f", b-a}')
    echo "SANLOCK-TIME cut-off -> A killed: ${KILL_S} s (exit status $A_RC; expected <= $((8 * IO_TIMEOUT)) s = 8 x io_timeout after A's last renewal)"
    if [ "$A_RC" = 137 ] || [ "$A_RC" = 143 ]; then
        result a-killed PASS "blkshim pid $APID exit $A_RC ($([ "$A_RC" = 137 ] && echo SIGKILL || echo SIGTERM)) ${KILL_S} s after the cut; daemon A: $(grep -iE 'kill|renewal|fail' /tmp/sanlock-a.log | head -6 | tr '\n' ' ' | cut -c1-500)"
    else
        result a-killed FAIL "exit $A_RC after ${KILL_S} s: $(oneline /tmp/a.out) $(oneline /tmp/a.err)"
    fi
else
    result a-killed FAIL "A's blkshim still running 60 s after the cut: $(grep -iE 'kill|renewal' /tmp/sanlock-a.log | tail -5 | tr '\n' ' ')"
fi
A_LAST=$(dd if=/dev/sda bs=512 skip=$DATA_SECTOR count=1 2>/dev/null | tr -d '\000')

# --- B takes the lease after host_dead_seconds -------------------------------------------------------
if wait_for /tmp/b.exit . 150; then
    set -- $(cat /tmp/b.exit)
    B_RC=$1 B_T=$2
    B_ACQ=$(grep '"command":"acquire"' /tmp/b.out | head -1)
    # The acquire line's elapsed_s counts from B's command's start (T_B).
    ACQ_S=$(echo "$B_ACQ" | grep -o '"elapsed_s":[0-9.]*' | cut -d: -f2)
    B_AT=$(awk -v b="$T_B" -v e="${ACQ_S:-0}" 'BEGIN{printf "%.1f", b + e}')
    ACQ_S=$(awk -v c="$T_CUT" -v b="$B_AT" 'BEGIN{printf "%.1f", b - c}')
    # sanlock's clock is CLOCK_MONOTONIC seconds, /proc/uptime's too (no suspend here).
    A_LAST_OK=$(grep -o 'last_success [0-9]*' /tmp/sanlock-a.log | tail -1 | cut -d' ' -f2)
    DEAD=$((8 * IO_TIMEOUT + 60))
    SINCE_RENEWAL=$(awk -v l="${A_LAST_OK:-0}" -v b="$B_AT" 'BEGIN{printf "%.1f", b - l}')
    echo "SANLOCK-TIME cut-off -> B acquires: ${ACQ_S} s; A's last renewal -> B acquires: ${SINCE_RENEWAL} s (host_dead_seconds $DEAD; A's last renewal at ${A_LAST_OK:-?}, the cut at $T_CUT, B acquired at $B_AT)"
    if echo "$B_ACQ" | grep -q '"ok":true' && echo "$B_ACQ" | grep -q '"lver":2' &&
        awk -v s="$SINCE_RENEWAL" -v d="$DEAD" 'BEGIN{exit !(s >= d)}' &&
        awk -v b="$B_AT" -v a="${A_T:-999999}" 'BEGIN{exit !(b > a)}'; then
        result b-acquires PASS "${ACQ_S} s after the cut, ${SINCE_RENEWAL} s (>= host_dead $DEAD) after A's last renewal, after A was killed, lver 2: $(echo "$B_ACQ" | cut -c1-400) | B read A's last mark: '$(grep -v '^{' /tmp/b.out | head -1)' (A's last mark on sda after A died: '$A_LAST')"
    else
        result b-acquires FAIL "exit $B_RC: $(oneline /tmp/b.out) $(oneline /tmp/b.err)"
    fi
    if [ "$B_RC" = 0 ] && grep -q '"command":"release".*"ok":true' /tmp/b.out; then
        result b-release PASS "$(grep '"command":"release"' /tmp/b.out)"
    else
        result b-release FAIL "exit $B_RC: $(oneline /tmp/b.out)"
    fi
else
    result b-acquires FAIL "B has no lease 150 s after the cut: $(oneline /tmp/b.out) $(oneline /tmp/b.err)"
fi
if lease_b read --disk vm1 >/tmp/read2.out 2>&1 && grep -q '"lver":2' /tmp/read2.out; then
    result lver-advanced PASS "$(grep -o '{.*' /tmp/read2.out)"
else
    result lver-advanced FAIL "$(oneline /tmp/read2.out)"
fi

# --- a lagging lease is advanced to the epoch (lver 2 -> epoch 5: two catch-up cycles) ---
if lease_b acquire --disk vm1 --epoch 5 >/tmp/b5.out 2>/tmp/b5.err && grep -q '"lver":5' /tmp/b5.out &&
    lease_b read --disk vm1 >/tmp/read5.out 2>&1 && grep -q '"lver":5' /tmp/read5.out; then
    result catch-up PASS "$(grep '"command":"acquire"' /tmp/b5.out | cut -c1-300) | $(grep -o 'acquired at lver.*' /tmp/b5.err | head -1)"
else
    result catch-up FAIL "$(oneline /tmp/b5.out) $(oneline /tmp/b5.err)"
fi

# --- the watchdog never fired ---------------------------------------------------------------------------
if dmesg | grep -qiE 'softdog: (Triggered|Initiating)'; then
    result watchdog-quiet FAIL "$(dmesg | grep -iE 'softdog|watchdog' | tail -3 | tr '\n' ' ')"
else
    result watchdog-quiet PASS "no softdog trigger in dmesg at uptime $(now) ($(since $T_CUT) s after the cut; wdmd closed it uncleanly $(dmesg | grep -c 'watchdog did not stop') time(s) while A's expiry neared, and reopened it once A's writer was dead); wdmd: $(grep -iE 'fail|expire|close' /tmp/wdmd.log | tail -3 | tr '\n' ' ' | cut -c1-300)"
fi
echo "--- sanlock A log (tail) ---"; tail -15 /tmp/sanlock-a.log
echo "--- sanlock B log (tail) ---"; tail -8 /tmp/sanlock-b.log
echo "--- wdmd log (tail) ---"; tail -8 /tmp/wdmd.log
# Stop the daemons without leaving the watchdog armed (wdmd closes it cleanly on SIGTERM).
SANLOCK_RUN_DIR=/run/sanlock-b sanlock client shutdown -f 1 >/dev/null 2>&1
SANLOCK_RUN_DIR=/run/sanlock-a sanlock client shutdown -f 1 >/dev/null 2>&1
sleep 1
kill $WDMD 2>/dev/null
exit 0
