#!/bin/sh
# /payload/run.sh of the host-side fencing guest (hostside.sh puts it
# there): LIO exports one fileio backstore through two tcm_loop targets, so
# /dev/sda and /dev/sdb are two I_T nexuses onto one logical unit; then
# seeds/002's sequence through PrFencing (/payload/pr_lio, the
# tests/pr_lio.rs test binary) and the `blkshim pr` command line; then the
# two-instance scenarios of /payload/scenarios.sh (hostside-scenarios.sh). Prints
# HOSTSIDE-RESULT <step> PASS|FAIL <evidence>. Every wait is bounded.
set -u
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
P=/payload
T=/sys/kernel/config/target
STEP_TIMEOUT=${STEP_TIMEOUT:-60}

result() { echo "HOSTSIDE-RESULT $1 $2 $3"; }

# --- LIO -------------------------------------------------------------------
setup_lio() {
    mount -t configfs configfs /sys/kernel/config 2>/dev/null || true
    [ -d "$T" ] || { echo "no $T"; return 1; }
    # APTPL state directory: sd registers with APTPL set, LIO writes it here.
    mkdir -p /etc/target/pr /var/target/pr
    dd if=/dev/zero of=/tmp/shared.img bs=1M count=64 2>/dev/null || return 1
    mkdir -p $T/core/fileio_0/disk0 || return 1
    echo "fd_dev_name=/tmp/shared.img,fd_dev_size=67108864" >$T/core/fileio_0/disk0/control || return 1
    echo 1 >$T/core/fileio_0/disk0/enable || return 1
    for i in 1 2; do
        tpg=$T/loopback/naa.5001405000000a0$i/tpgt_1
        mkdir -p $tpg || return 1
        # The nexus first: a LUN made before it gives "I_T Nexus does not exist".
        echo naa.5001405000000b0$i >$tpg/nexus || return 1
        mkdir $tpg/lun/lun_0 || return 1
        ln -s $T/core/fileio_0/disk0 $tpg/lun/lun_0/disk0 || return 1
    done
}

wait_dev() { # bounded: 30 s
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ $i -gt 300 ] && return 1
        sleep 0.1
    done
}

t0=$(cut -d' ' -f1 /proc/uptime)
if setup_lio 2>/tmp/lio.err && wait_dev /dev/sda && wait_dev /dev/sdb; then
    result lio-setup PASS "fileio 64MiB via 2 tcm_loop nexuses: sda=$(cat /sys/block/sda/size 2>/dev/null) sdb=$(cat /sys/block/sdb/size 2>/dev/null) sectors, both $(cat /sys/block/sda/device/vendor 2>/dev/null | tr -d ' ')/$(cat /sys/block/sda/device/model 2>/dev/null | tr -d ' '), hosts $(basename "$(readlink /sys/block/sda/device)") $(basename "$(readlink /sys/block/sdb/device)") (setup from uptime $t0)"
else
    result lio-setup FAIL "$(tr '\n' ' ' </tmp/lio.err) $(ls /dev/sd* 2>&1 | tr '\n' ' ')"
    exit 1
fi

# Run a command bounded by STEP_TIMEOUT seconds (busybox has `timeout`).
bounded() { timeout "$STEP_TIMEOUT" "$@"; }

# --- seeds/002 through PrFencing (the pr_lio test binary) -------------------
if [ -x $P/pr_lio ]; then
    BLKSHIM_PR_DEVS=/dev/sda,/dev/sdb RUST_LOG=${GUEST_RUST_LOG:-warn} \
        bounded $P/pr_lio --exact seeds_002_on_two_paths --nocapture --test-threads=1 >/tmp/pr_lio.out 2>&1
    rc=$?
    grep -o 'HOSTSIDE-RESULT .*' /tmp/pr_lio.out
    if [ $rc -eq 0 ]; then
        result pr_lio-binary PASS "tests/pr_lio.rs exit 0: $(grep -o 'pr_lio: .*' /tmp/pr_lio.out)"
    else
        echo "--- pr_lio output (exit $rc) ---"
        grep -v 'HOSTSIDE-RESULT ' /tmp/pr_lio.out | tail -40
        result pr_lio-binary FAIL "exit $rc (124: timeout)"
    fi
else
    result pr_lio-binary FAIL "no $P/pr_lio"
fi

# --- the blkshim pr command line ---------------------------------------------
B=$P/blkshim
if [ ! -x $B ]; then
    result cli FAIL "no $B"
    exit 1
fi
# cli STEP EXPECTED_RC PATTERN... -- ARGS: run `blkshim pr ARGS`; PASS when
# the exit status is EXPECTED_RC and the JSON contains every PATTERN.
cli() {
    step=$1 want=$2
    shift 2
    pats=""
    while [ "$1" != "--" ]; do pats="$pats
$1"; shift; done
    shift
    out=$(RUST_LOG=warn bounded $B pr "$@" 2>/tmp/cli.err)
    rc=$?
    ok=1
    [ $rc -eq "$want" ] || ok=0
    printf '%s\n' "$pats" | { while IFS= read -r p; do
        [ -z "$p" ] && continue
        case "$out" in *"$p"*) ;; *) exit 1 ;; esac
    done; } || ok=0
    if [ $ok = 1 ]; then
        result "$step" PASS "blkshim pr $* -> rc $rc $out"
    else
        result "$step" FAIL "blkshim pr $* -> rc $rc (want $want) $out $(tr '\n' ' ' </tmp/cli.err)"
    fi
}

cli cli-takeover 0 '"ok":true' '"holder_epoch":7' '"mode":"preempt"' '"type":"write-exclusive"' -- \
    /dev/sda takeover 7 --no-abort
cli cli-keys 0 '"epoch":7' '"owner":"blkshim"' '"key":"0x626b730000000007"' -- /dev/sdb keys
cli cli-stale-takeover-refused 1 '"kind":"held-by-newer"' '"holder_epoch":7' '"epoch":6' -- \
    /dev/sdb takeover 6 --no-abort
cli cli-preempt-newer 0 '"preempted_epochs":[7]' '"holder_epoch":8' -- /dev/sdb takeover 8 --no-abort

# The preempted path's write, from busybox dd (O_DIRECT): EBADE, "Invalid exchange".
printf 'STALE-WRITE-FROM-SDA' >/tmp/stale.bin
dd if=/tmp/stale.bin of=/tmp/stale512 bs=512 count=1 conv=sync 2>/dev/null
bounded dd if=/tmp/stale512 of=/dev/sda bs=512 seek=11 count=1 oflag=direct 2>/tmp/dd.err
rc=$?
bounded dd if=/dev/sdb of=/tmp/back bs=512 skip=11 count=1 iflag=direct 2>/dev/null
if [ $rc -ne 0 ] && grep -q 'Invalid exchange' /tmp/dd.err && ! grep -q STALE-WRITE /tmp/back; then
    result cli-dd-fenced-write PASS "dd to /dev/sda (preempted) rc $rc: $(tr '\n' ' ' </tmp/dd.err); sector 11 via sdb does not hold it"
else
    result cli-dd-fenced-write FAIL "dd rc $rc: $(tr '\n' ' ' </tmp/dd.err); sdb sector 11: $(head -c 32 /tmp/back | tr -c '[:print:]' .)"
fi

# A stale key through sd: the raw status as Linux 6.1 returns it.
cli cli-stale-register-conflict 1 '"kind":"reservation-conflict"' '"status":"0x' -- \
    /dev/sda register epoch:7 --old epoch:7
cli cli-reservation 0 '"epoch":8' '"type":"write-exclusive"' -- /dev/sda reservation
cli cli-clear 0 '"ok":true' -- /dev/sdb clear epoch:8
cli cli-cleared 0 '"keys":[]' -- /dev/sda keys

# --- two blkshim instances in host-side mode (hostside-scenarios.sh) ---------
if [ -x $P/scenarios.sh ]; then
    $P/scenarios.sh
fi
exit 0
