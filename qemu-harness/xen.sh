#!/bin/bash
# Real-Xen harness: boots Debian's Xen 4.17 under qemu (TCG) with a busybox
# dom0 and runs the stale-write scenarios of seeds/003 against the kernel's
# xen-blkback (negative control: the corruption must show) and against
# `blkshim xen-backend` (must stay clean).
#
#   qemu-harness/xen.sh [--backend blkback|blkshim|both] [--scenarios save,migrate,...]
#                       [--full] [--perf] [--delay S] [--migrate-delay S] [--hook-delay S]
#                       [--blkshim PATH] [--blkshim-args 'ARGS'] [--selftest-bin PATH]
#                       [--timeout S]
#
# Scenarios (default: save,migrate on both back ends; selftest, hooked,
# destroy, features, teardown on blkshim; --full adds load, --perf adds perf):
#   selftest (blkshim) tests/xen_real (cargo test --features xen
#            --test xen_real) run in dom0 before the daemon starts: a dom0
#            loopback vbd over real XenStore, grants and event channels
#   save     PV domU, probe writing gens 1..5 on 8 blocks; gen 1 held by
#            dm-delay (--delay, 30 s) on the source path; xl save 10 s after
#            gen 1 + xl restore onto the undelayed path
#   migrate  the same with a PVH domU and a local `xl migrate` 5 s after gen
#            1 (--migrate-delay, default delay+10: the pre-copy takes 10-20 s)
#   hooked   (blkshim) save with --hook-delay and a destination hook that
#            writes blkshim-resume = wait into the new vbd's directory
#   destroy  (blkshim) `xl destroy` with writes held in dm-delay: the source's
#            hand-off record must appear, blkshim keep serving
#   load     xen-loadprobe (verifying AIO random writes + reads) under
#            LOAD_OPS (2) save/restores of a PV domU (plus fio crc32c verify
#            rounds beside it) and LOAD_OPS local migrations of a PVH domU
#   features (blkshim) vcpus=2, blkfront max_ring_page_order=2: 1 MiB
#            O_DIRECT I/O (indirect), blkdiscard, fsync (flush), AIO on both
#            CPUs (multi-queue); negotiated in XenStore AND used per blkshim's
#            ring statistics
#   teardown (blkshim) xl destroy mid-I/O and a clean xl shutdown: no vbd/ring
#            thread, gntdev mapping, XenStore node or (null) domain left
#   perf     fio 4k randwrite/randread qd16 and 1M write, 15 s each, against
#            blkshim then xen-blkback in the same dom0 (ratios only)
# A race scenario counts only if "armed": the probe saw the domain suspended
# (a CLOCK_BOOTTIME-vs-MONOTONIC jump) with gen 1's writes still in flight.
#
# Prints `XEN-RESULT <scenario> <backend> PASS|FAIL <evidence>` per scenario
# and `N passed, M failed`; exits 0 only if every scenario met its
# expectation. Logs (each serial console with host timestamps, files dom0
# sent back: xenstore snapshots and watch logs, xl -vvv logs, blkshim's log)
# go to the printed workdir /tmp/xh-*. See the end of this file for env vars.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BACKENDS=both
SCENARIOS=${SCENARIOS:-}
DELAY=${DELAY:-30}
HOOK_DELAY=${HOOK_DELAY:-60}
MIGRATE_DELAY=${MIGRATE_DELAY:-}
BLKSHIM=${BLKSHIM:-}
TIMEOUT=${TIMEOUT:-}
BLKSHIM_ARGS=${BLKSHIM_ARGS:-}
XEN_REAL_BIN=${XEN_REAL_BIN:-}
FULL=0
PERF=0
while [ $# -gt 0 ]; do
    case "$1" in
    --backend) BACKENDS=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --delay) DELAY=$2; shift 2 ;;
    --hook-delay) HOOK_DELAY=$2; shift 2 ;;
    --migrate-delay) MIGRATE_DELAY=$2; shift 2 ;;
    --blkshim) BLKSHIM=$2; shift 2 ;;
    --blkshim-args) BLKSHIM_ARGS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --selftest-bin) XEN_REAL_BIN=$2; shift 2 ;;
    --full) FULL=1; shift ;;
    --perf) PERF=1; shift ;;
    -h | --help) sed -n '2,45p' "$0"; exit 0 ;;
    *) echo "xen.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
MIGRATE_DELAY=${MIGRATE_DELAY:-$((DELAY + 10))}
case "$BACKENDS" in both) BACKENDS="blkback blkshim" ;; blkback | blkshim) ;; *) echo "xen.sh: bad --backend" >&2; exit 2 ;; esac

START=$(date +%s)
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/xh-XXXXXX)}
mkdir -p "$WORKDIR"
echo "xen.sh: workdir $WORKDIR"
say() { echo "xen.sh: [$(($(date +%s) - START))s] $*"; }
QPID=""
cleanup() {
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill "$QPID" 2>/dev/null; sleep 1; kill -9 "$QPID" 2>/dev/null
    fi
    [ -n "${TSPID:-}" ] && kill "$TSPID" 2>/dev/null
    if [ -n "${WDPID:-}" ]; then kill "$WDPID" 2>/dev/null; pkill -P "$WDPID" 2>/dev/null; fi
    wait 2>/dev/null
}
trap cleanup EXIT
# Interrupted (the overall timeout, or a signal): judge the boot under way
# from what its console said so far, and FAIL every planned scenario that
# has no result yet. A run that stops early never reads as a pass.
CUR_BE=""; CUR_SCNS=""
mark_unjudged() { # why
    local be s
    for be in $BACKENDS; do
        for s in $(scns_for "$be" 2>/dev/null | tail -1 | tr ':' ' '); do
            grep -q "^XEN-RESULT $s $be " "$WORKDIR/results" 2>/dev/null && continue
            echo "XEN-RESULT $s $be FAIL interrupted=1 -- not judged: $1" | tee -a "$WORKDIR/results"
        done
    done
}
on_interrupt() {
    say "interrupted"
    if [ -n "$CUR_BE" ] && [ -f "$WORKDIR/serial-$CUR_BE.log" ] && ! grep -q " $CUR_BE " "$WORKDIR/results" 2>/dev/null; then
        python3 -c "$JUDGEPY" "$WORKDIR" "$CUR_BE" "$CUR_SCNS"
    fi
    mark_unjudged "the run was interrupted (overall timeout ${TIMEOUT:-none}s, or a signal)"
    exit 130
}
trap on_interrupt INT TERM
# The whole run is bounded: a watchdog signals this script at --timeout
# (default: every boot's own bound plus 10 minutes to build; set below, once
# the scenarios are known). Until then, an hour.
( sleep "${TIMEOUT:-3600}" && { echo "xen.sh: overall timeout ${TIMEOUT:-3600}s" >&2; kill -TERM $$; } ) &
WDPID=$!

# ---- prerequisites -----------------------------------------------------------
need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
for p in cpio gcc libc6-dev dmsetup libxen-dev busybox-static fio python3 binutils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need="$need $p"
done
if [ -n "$need" ]; then
    say "installing:$need"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need >"$WORKDIR/apt.log" 2>&1 ||
        { say "apt-get install failed (see $WORKDIR/apt.log)"; exit 1; }
fi

say "building/reusing the Xen images"
t0=$(date +%s)
IMG=$("$HERE/build-xen.sh" 2>"$WORKDIR/build-xen.log" | tail -1)
if [ -z "$IMG" ] || [ ! -s "$IMG/xen" ]; then say "build-xen.sh failed:"; tail -20 "$WORKDIR/build-xen.log"; exit 1; fi
say "images $IMG ($(($(date +%s) - t0))s)"

# ---- blkshim -----------------------------------------------------------------
if echo "$BACKENDS" | grep -q blkshim; then
    if [ -z "$BLKSHIM" ]; then
        say "cargo build --release --features xen"
        (cd "$REPO" && cargo build --release --features xen) >"$WORKDIR/cargo.log" 2>&1 ||
            { say "cargo build failed (see $WORKDIR/cargo.log)"; exit 1; }
        BLKSHIM=$REPO/target/release/blkshim
    fi
    [ -x "$BLKSHIM" ] || { say "no blkshim binary at $BLKSHIM"; exit 1; }
    say "blkshim $BLKSHIM ($(stat -c '%s bytes, %y' "$BLKSHIM"))"
fi

# The per-run cpio, appended to the cached dom0 one: blkshim (stripped) and
# its libraries, and /etc/xh/run.conf.
mkrun() { # backend scenarios -> path of the dom0 initrd for this boot
    local be=$1 scns=$2 R=$WORKDIR/run-$1
    rm -rf "$R"; mkdir -p "$R/etc/xh" "$R/opt/blkshim"
    {
        echo "BACKEND=$be"
        echo "SCENARIOS='$scns'"
        echo "DELAY=$DELAY"
        echo "MIGRATE_DELAY=$MIGRATE_DELAY"
        echo "HOOK_DELAY=$HOOK_DELAY"
        echo "BLKSHIM_ARGS='$BLKSHIM_ARGS'"
        for v in SAVE_AFTER MIGRATE_AFTER MARGIN DISK_MB DISK_NAMING DOMU_MEM LOAD_OPS LOAD_PARTS LOAD_FIO LOAD_FIO_MB LOAD_GAP LOAD_BLOCKS LOAD_TIME LOAD_MEM LOAD_FINISH_TIMEOUT RUST_LOG HOOK_VALUE FEAT_ORDER FEAT_INDIRECT TD_DELAY TD_WAIT PERF_S SELFTEST_TIMEOUT LOAD_PVH_RATE LOAD_PVH_BLOCKS LOAD_BOOT_TRIES; do
            [ -n "${!v:-}" ] && echo "$v='${!v}'"
        done
    } >"$R/etc/xh/run.conf"
    if [ "$be" = blkshim ]; then
        strip -o "$R/opt/blkshim/blkshim" "$BLKSHIM" 2>/dev/null || cp "$BLKSHIM" "$R/opt/blkshim/blkshim"
        local l
        local bins=$BLKSHIM
        if echo ":$scns:" | grep -q ':selftest:' && [ -n "$XEN_REAL_BIN" ]; then
            strip -o "$R/opt/blkshim/xen_real" "$XEN_REAL_BIN" 2>/dev/null || cp "$XEN_REAL_BIN" "$R/opt/blkshim/xen_real"
            bins="$bins $XEN_REAL_BIN"
        fi
        for l in $(ldd $bins | awk '/=> \//{print $3}' | sort -u); do
            mkdir -p "$R$(dirname "${l#/usr}")"
            cp -L "$l" "$R${l#/usr}"
        done
    fi
    (cd "$R" && find . | LC_ALL=C sort | cpio --quiet -o -H newc | gzip -1) >"$WORKDIR/run-$be.cpio.gz"
    cat "$IMG/dom0.cpio.gz" "$WORKDIR/run-$be.cpio.gz" >"$WORKDIR/dom0-$be.cpio.gz"
    echo "$WORKDIR/dom0-$be.cpio.gz"
}

# ---- scenarios per back end ------------------------------------------------------
scns_for() { # backend -> scenarios for it (colon separated)
    local be=$1 all s out=""
    if [ -n "$SCENARIOS" ]; then all=$(echo "$SCENARIOS" | tr ',' ' ')
    elif [ "$be" = blkshim ]; then
        all="selftest save migrate hooked destroy features teardown"
        [ "$FULL" = 1 ] && all="$all load"
    else all="save migrate"; fi
    # perf runs in the blkshim boot (blkshim, then xen-blkback in the same
    # dom0), or in the blkback boot when that is the only one.
    if [ "$PERF" = 1 ] && { [ "$be" = blkshim ] || ! echo "$BACKENDS" | grep -q blkshim; }; then all="$all perf"; fi
    for s in $all; do
        case "$s" in
        hooked | destroy | selftest | features | teardown) [ "$be" = blkshim ] || { say "skipping $s on $be (blkshim only)"; continue; } ;;
        esac
        out="$out${out:+:}$s"
    done
    echo "$out"
}
estimate() { # scenarios -> seconds this boot may take
    local t=150 s
    for s in $(echo "$1" | tr ':' ' '); do
        case "$s" in
        save | destroy) t=$((t + DELAY + 150)) ;;
        migrate) t=$((t + MIGRATE_DELAY + 150)) ;;
        hooked) t=$((t + HOOK_DELAY + 150)) ;;
        load) t=$((t + 500)) ;;
        selftest) t=$((t + 320)) ;;
        features) t=$((t + 240)) ;;
        teardown) t=$((t + 400)) ;;
        perf) t=$((t + 500)) ;;
        *) t=$((t + 60)) ;;
        esac
    done
    echo $t
}

# Timestamp every console line (host wall clock and seconds since the boot);
# echo progress lines to the terminal.
TSPY='
import sys, time
t0 = time.time(); out = open(sys.argv[1], "w")
show = ("XEN-LOG", "XEN-SCN", "XEN-DOM0READ", "XEN-DONE", "XEN-SELFTEST test")
for raw in sys.stdin.buffer:
    t = time.time()
    line = raw.rstrip(b"\r\n").decode("utf-8", "replace").replace("\r", "")
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + ".%03d" % int((t % 1) * 1000)
    out.write("%s +%7.2f %s\n" % (stamp, t - t0, line)); out.flush()
    if line.startswith(show) or ("XEN-DOMU" in line and ("PROBE-RESULT" in line or "DOMU-FIO-FINAL" in line or "LOAD-RESULT" in line or "LOAD-SUSPENDED" in line or "DOMU-FEAT " in line or "DOMU-PERF " in line)) \
       or "(XEN) Panic" in line or "Kernel panic" in line:
        sys.stderr.write("  %s +%6.1f %s\n" % (stamp, t - t0, line[:300])); sys.stderr.flush()
'

boot() { # backend scenarios
    local be=$1 scns=$2 initrd est log=$WORKDIR/serial-$1.log rc
    initrd=$(mkrun "$be" "$scns")
    est=$(estimate "$scns")
    local append="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all console_timestamps=boot dom0_mem=1024M,max:1024M dom0_max_vcpus=2 noreboot${XEN_CMDLINE_EXTRA:+ $XEN_CMDLINE_EXTRA}"
    local modules="$IMG/vmlinuz console=hvc0 earlyprintk=xen rdinit=/init xh.backend=$be xh.scenarios=$scns,$initrd"
    local cmd=(qemu-system-x86_64 -accel "${XEN_ACCEL:-tcg}" -machine pc -cpu qemu64,+svm,+npt -m 2048 -smp 2
        -nographic -monitor none -serial stdio -no-reboot -kernel "$IMG/xen" -append "$append" -initrd "$modules")
    printf '%q ' "${cmd[@]}" >"$WORKDIR/qemu-$be.cmd"; echo >>"$WORKDIR/qemu-$be.cmd"
    say "boot $be: scenarios $scns (timeout ${est}s), console $log"
    local tb=$(date +%s) fifo=$WORKDIR/console-$be.fifo
    rm -f "$fifo"; mkfifo "$fifo"
    python3 -u -c "$TSPY" "$log" <"$fifo" &
    TSPID=$!
    "${cmd[@]}" </dev/null >"$fifo" 2>"$WORKDIR/qemu-$be.stderr" &
    QPID=$!
    local n=0
    while kill -0 "$QPID" 2>/dev/null; do
        sleep 1; n=$((n + 1))
        if [ $n -ge "$est" ]; then
            say "boot $be: timeout after ${est}s; killing qemu"
            kill "$QPID" 2>/dev/null; sleep 2; kill -9 "$QPID" 2>/dev/null
            break
        fi
    done
    wait "$QPID" 2>/dev/null
    wait "$TSPID" 2>/dev/null
    rm -f "$fifo" "$initrd" # the cached dom0 cpio + the run cpio: 50 MB per boot
    TSPID=""; QPID=""
    say "boot $be done in $(($(date +%s) - tb))s"
    echo "$be $(($(date +%s) - tb))" >>"$WORKDIR/boot-times"
}

# ---- judge -------------------------------------------------------------------------
JUDGEPY='
import os, re, sys
wd, be, scns = sys.argv[1], sys.argv[2], [s for s in sys.argv[3].split(":") if s]
log = os.path.join(wd, "serial-%s.log" % be)
files, scn_lines, domu, blk = {}, {}, {}, []
done = False
# Triple faults Xen logged since the last scenario verdict: a boot that
# times out after them lost its scenario to a guest crashing under TCG.
tf_open = 0
# Triple faults after the probe of a race scenario started (dom0 logs "<scn>: gen 1
# submitted"), counted here from the whole serial log: the console ring of Xen in
# dom0 may wrap. A PVH boot that crashed before that was restarted by Xen and
# never ran the probe, so it does not touch the verdict.
tf_probe, probing = {}, None
for line in open(log, errors="replace"):
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) < 3: continue
    text = parts[2]
    if "(XEN)" in text and "Triple fault" in text:
        tf_open += 1
        if probing: tf_probe[probing] += 1
    m = re.search(r"XEN-LOG [0-9.]+ (\S+): gen 1 submitted", text)
    if m:
        probing = m.group(1); tf_probe[probing] = 0
    i = text.find("XEN-SCN ")  # may follow an unterminated line
    if i < 0: i = text.find("XEN-")
    if i < 0: continue
    text = text[i:]
    if text.startswith("XEN-FILE "):
        _, name, *rest = text.split(" ", 2)
        files.setdefault(name, []).append(rest[0] if rest else "")
    elif text.startswith("XEN-SCN "):
        kv = dict(w.split("=", 1) for w in text.split()[2:] if "=" in w)
        scn_lines[text.split()[1]] = kv
        tf_open = 0; probing = None
    elif text.startswith("XEN-DOMU "):
        w = text.split(" ", 2)
        domu.setdefault(w[1], []).append(parts[0] + " " + parts[1] + " " + (w[2] if len(w) > 2 else ""))
    elif text.startswith("XEN-DONE"):
        done = True
fdir = os.path.join(wd, "files-" + be); os.makedirs(fdir, exist_ok=True)
for name, lines in files.items():
    open(os.path.join(fdir, os.path.basename(name)), "w").write("\n".join(lines) + "\n")
for s, lines in domu.items():
    open(os.path.join(wd, "domU-%s-%s.log" % (be, s)), "w").write("\n".join(lines) + "\n")
res = []
for s in scns:
    kv = scn_lines.get(s)
    if kv is None:
        why = "no result from dom0 (boot %s)" % ("ended" if done else "timed out or crashed")
        if tf_open and not done:
            # Counted as the emulation failing (rerun by tests/all.sh), never as a
            # pass: the scenario has no verdict.
            why += " triple_faults=%d -- INVALID run: Xen logged %d triple fault(s) after the last verdict, a guest crashing under TCG (PVH), before this scenario ended" % (tf_open, tf_open)
        res.append((s, "FAIL", why)); continue
    if "error" in kv:
        res.append((s, "FAIL", "error=" + kv["error"])); continue
    ev = " ".join("%s=%s" % (k, kv[k]) for k in ("probe", "completed", "dom0_gens", "stale_blocks", "armed", "save_s", "restore_s", "migrate_s", "record_appeared", "record_after_s", "blkshim_alive", "src_vbd_left", "ops", "ops_failed", "final", "round_verify_errors_total", "elapsed_s") if kv.get(k) not in (None, ""))
    if kv.get("op") in ("save", "migrate"):
        probe = kv.get("probe", "none"); stale = int(kv.get("stale_blocks", "0") or 0)
        armed = kv.get("armed") == "1"; completed = kv.get("completed", "0")
        if be == "blkback":
            ok = armed and probe.startswith("CORRUPTION") and stale > 0
            why = "expected CORRUPTION (probe flags a block older than a completed generation and dom0 reads it)"
        else:
            gens = kv.get("dom0_gens", "").split(",")
            ok = armed and probe.startswith("CLEAN") and completed == "5" and stale == 0 and all(g == "5" for g in gens)
            why = "expected CLEAN (all 5 generations complete, probe and dom0 read gen 5 everywhere)"
        if not armed: why += "; race NOT armed (gen 1 completed before the %s)" % kv.get("op")
        tf = tf_probe.get(s)
        crashed = kv.get("domu_boots", "1") != "1" or tf is None or tf > 0
        if crashed:
            ok = False
            why += "; INVALID run: a guest crashed (Xen logged %s triple fault(s) after the probe started; the probe booted %s times), PVH under TCG" % (tf, kv.get("domu_boots"))
            ev += " domu_boots=%s triple_faults=%s" % (kv.get("domu_boots"), tf)
        if kv.get("boot_triple_faults", "0") not in ("0", ""):
            ev += " boot_triple_faults=%s" % kv["boot_triple_faults"]
        res.append((s, "PASS" if ok else "FAIL", ev + ("" if ok else " -- " + why) + (" record=" + kv["record"] if kv.get("record", "none") != "none" else "")))
    elif kv.get("op") == "destroy":
        ok = kv.get("armed") == "1" and kv.get("record_appeared") == "1" and kv.get("blkshim_alive") == "1" and kv.get("src_vbd_left") == "0"
        res.append((s, "PASS" if ok else "FAIL", ev + " record=" + kv.get("record", "none")))
    elif kv.get("op") == "load":
        # Each part: every op succeeded, the probe saw every suspend, verified
        # everything CLEAN, the domU never rebooted; fio (PV) without errors.
        nops = int(kv.get("load_ops", "0") or 0); why = []
        if kv.get("ops_failed") != "0": why.append("ops_failed=" + kv.get("ops_failed", "?"))
        for part in kv.get("parts", "").split(","):
            r = kv.get(part + "_result", "none")
            if not r.startswith("CLEAN"): why.append(part + " probe " + r)
            if int(kv.get(part + "_suspends", "0") or 0) < nops: why.append(part + " probe saw %s of %d suspends" % (kv.get(part + "_suspends"), nops))
            if kv.get(part + "_boots") != "1": why.append(part + " domU booted %s times" % kv.get(part + "_boots"))
        if kv.get("left_vbds", "none") != "none": why.append("vbds left in XenStore: " + kv["left_vbds"])
        if kv.get("vbd_threads_left", "0") != "0" or kv.get("gntdev_maps_left", "0") != "0": why.append("blkshim still has %s vbd/ring threads, %s gntdev maps" % (kv.get("vbd_threads_left"), kv.get("gntdev_maps_left")))
        if "pv_fio" in kv:
            f = kv["pv_fio"]
            fd = dict(w.split("=", 1) for w in f.split(",") if "=" in w)
            if not (fd.get("rc") == "0" and fd.get("verify_errors") == "0" and fd.get("failed_rounds") == "0" and fd.get("round_errors") == "0" and fd.get("rounds", "0") != "0"):
                why.append("fio " + f)
        ok = not why and kv.get("parts")
        ev = " ".join("%s=%s" % (k, v) for k, v in kv.items() if k not in ("backend", "op"))
        res.append((s, "PASS" if ok else "FAIL", ev + ("" if ok else " -- " + "; ".join(why))))
    elif kv.get("op") == "selftest":
        p_ = int(kv.get("passed") or 0); f_ = kv.get("failed") or "?"
        ok = kv.get("rc") == "0" and p_ >= 4 and f_ == "0"
        ev = "summary=%s rc=%s failed_tests=%s left_vbds=%s elapsed_s=%s" % (kv.get("summary"), kv.get("rc"), kv.get("failed_tests"), kv.get("left_vbds"), kv.get("elapsed_s"))
        res.append((s, "PASS" if ok else "FAIL", ev + ("" if ok else " -- expected N passed; 0 failed with N >= 4 (output: files-%s/selftest.txt)" % be)))
    elif kv.get("op") == "features":
        why = []
        def num(k, d=-1):
            try: return int(kv.get(k, ""))
            except ValueError: return d
        rings = []
        for r in kv.get("rings", "none").split(";"):
            f = r.split(":")
            if len(f) == 11: rings.append([int(x) for x in f])
        tot = lambda i: sum(r[i] for r in rings)
        conn = kv.get("connected", "none").split(",")
        cpus = num("domu_cpus")
        want_order = int(os.environ.get("FEAT_ORDER", "2"))
        # multi-queue: one queue per vCPU, negotiated, in sysfs, in the log, each used
        if num("fe_multi_queue_num_queues") != cpus or cpus < 2: why.append("multi-queue-num-queues %s for %s vCPUs" % (kv.get("fe_multi_queue_num_queues"), cpus))
        if num("sysfs_hw_queues") != cpus: why.append("guest has %s hw queues" % kv.get("sysfs_hw_queues"))
        if len(rings) != cpus or (conn[0] != str(cpus)): why.append("blkshim: %d ring stats, connected %s" % (len(rings), kv.get("connected")))
        if any(r[1] == 0 for r in rings): why.append("a ring consumed no request")
        if "cpu0:CLEAN" not in kv.get("domu_mq", "") or "cpu1:CLEAN" not in kv.get("domu_mq", ""): why.append("per-CPU load " + kv.get("domu_mq", "none"))
        # ring order
        if num("fe_ring_page_order") != want_order or len(conn) < 2 or conn[1] != str(want_order): why.append("ring-page-order %s, blkshim order %s" % (kv.get("fe_ring_page_order"), conn[1] if len(conn) > 1 else "?"))
        # indirect
        if num("be_feature_max_indirect_segments") <= 0 or tot(6) <= 0 or "cmp=ok" not in kv.get("domu_indirect", ""): why.append("indirect: offered %s, used %s, guest %s" % (kv.get("be_feature_max_indirect_segments"), tot(6) if rings else "?", kv.get("domu_indirect")))
        # discard
        if kv.get("be_feature_discard") != "1" or tot(5) <= 0 or not kv.get("domu_discard", "").startswith("rc=0"): why.append("discard: offered %s, used %s, guest %s" % (kv.get("be_feature_discard"), tot(5) if rings else "?", kv.get("domu_discard")))
        # flush
        if kv.get("be_feature_flush_cache") != "1" or tot(4) <= 0 or kv.get("domu_flush") != "rc=0": why.append("flush: offered %s, used %s, guest %s" % (kv.get("be_feature_flush_cache"), tot(4) if rings else "?", kv.get("domu_flush")))
        if rings and tot(7) != 0: why.append("%d requests refused" % tot(7))
        ok = not why
        ringev = ";".join("#%d:n=%d,r=%d,w=%d,f=%d,d=%d,ind=%d,ref=%d,pgrants=%d" % (r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[10]) for r in rings)
        keys = ("fe_multi_queue_num_queues", "fe_ring_page_order", "fe_feature_persistent", "be_feature_max_indirect_segments", "be_feature_discard", "be_feature_flush_cache", "be_feature_persistent", "be_max_ring_page_order", "be_multi_queue_max_queues", "sysfs_max_segments", "sysfs_max_hw_sectors_kb", "sysfs_discard_max_bytes", "sysfs_write_cache", "sysfs_hw_queues", "domu_indirect", "domu_discard", "domu_flush", "domu_mq", "connected", "shutdown_s", "elapsed_s")
        ev = " ".join("%s=%s" % (k, kv.get(k)) for k in keys) + " rings=" + (ringev or "none")
        res.append((s, "PASS" if ok else "FAIL", ev + ("" if ok else " -- " + "; ".join(why))))
    elif kv.get("op") == "teardown":
        ok = kv.get("ok") == "1" and kv.get("destroy") == "ok" and kv.get("shutdown") == "ok"
        ev = " ".join("%s=%s" % (k, v) for k, v in kv.items() if k not in ("backend", "op"))
        res.append((s, "PASS" if ok else "FAIL", ev))
    elif kv.get("op") == "perf":
        bes = {}
        for b in ("blkshim", "blkback"):
            if b in kv:
                bes[b] = {}
                for j in kv[b].split(","):
                    f = j.split(":")
                    if len(f) >= 3:
                        try: bes[b][f[0]] = (float(f[1]), float(f[2]))
                        except ValueError: pass
        parts = []
        ran = bool(bes) and all(len(v) >= 3 and all(x[0] > 0 for x in v.values()) for v in bes.values())
        for job in sorted(set().union(*[set(v) for v in bes.values()]) if bes else []):
            cell = " ".join("%s=%.0fiops/%.1fMiBs" % (b, bes[b][job][0], bes[b][job][1] / 1024) for b in bes if job in bes[b])
            if "blkshim" in bes and "blkback" in bes and job in bes["blkshim"] and job in bes["blkback"] and bes["blkback"][job][0] > 0:
                cell += " ratio=%.2f" % (bes["blkshim"][job][0] / bes["blkback"][job][0])
            parts.append("%s[%s]" % (job, cell))
        res.append((s, "PASS" if ran else "FAIL", " ".join(parts) + " perf_s=%s elapsed_s=%s" % (kv.get("perf_s"), kv.get("elapsed_s")) + ("" if ran else " -- raw " + " ".join("%s=%s" % (b, kv.get(b)) for b in ("blkshim", "blkback")))))
    else:
        res.append((s, "FAIL", "unknown op " + str(kv)))
with open(os.path.join(wd, "results"), "a") as f:
    for s, r, ev in res:
        line = "XEN-RESULT %s %s %s %s" % (s, be, r, ev)
        print(line); f.write(line + "\n")
'

if [ -z "$TIMEOUT" ]; then
    TIMEOUT=600
    for be in $BACKENDS; do TIMEOUT=$((TIMEOUT + $(estimate "$(scns_for "$be" | tail -1)"))); done
    kill "$WDPID" 2>/dev/null
    ( sleep "$((TIMEOUT - ($(date +%s) - START)))" && { echo "xen.sh: overall timeout ${TIMEOUT}s" >&2; kill -TERM $$; } ) &
    WDPID=$!
    say "overall bound ${TIMEOUT}s (the boots' own bounds plus 600s)"
fi

# The selftest's binary: tests/xen_real built with the xen feature.
if echo "$BACKENDS" | grep -q blkshim && echo ":$(scns_for blkshim 2>/dev/null):" | grep -q ':selftest:' && [ -z "$XEN_REAL_BIN" ]; then
    say "cargo test --features xen --test xen_real --no-run"
    t0=$(date +%s)
    XEN_REAL_BIN=$(cd "$REPO" && cargo test --features xen --test xen_real --no-run --message-format=json 2>"$WORKDIR/cargo-test.log" |
        python3 -c 'import sys, json
exe = ""
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("target", {}).get("name") == "xen_real": exe = m["executable"]
print(exe)')
    if [ -z "$XEN_REAL_BIN" ] || [ ! -x "$XEN_REAL_BIN" ]; then
        say "building the xen_real test binary failed (see $WORKDIR/cargo-test.log); selftest will report error=no-test-binary"
        XEN_REAL_BIN=""
    else
        say "selftest binary $XEN_REAL_BIN ($(($(date +%s) - t0))s)"
    fi
fi

for be in $BACKENDS; do
    scns=$(scns_for "$be")
    [ -n "$scns" ] || continue
    CUR_BE=$be; CUR_SCNS=$scns
    boot "$be" "$scns"
    python3 -c "$JUDGEPY" "$WORKDIR" "$be" "$scns"
    CUR_BE=""
done

pass=$(grep -c ' PASS ' "$WORKDIR/results" 2>/dev/null); pass=${pass:-0}
fail=$(grep -c ' FAIL ' "$WORKDIR/results" 2>/dev/null); fail=${fail:-0}
say "workdir $WORKDIR; total $(($(date +%s) - START))s; boots: $(tr '\n' ' ' <"$WORKDIR/boot-times" 2>/dev/null)"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]

# Environment (also options): BACKENDS via --backend, SCENARIOS, DELAY,
# HOOK_DELAY, BLKSHIM, BLKSHIM_ARGS (extra `blkshim xen-backend` options, e.g.
# "--resume-wait 30s"), TIMEOUT, WORKDIR; passed to dom0: SAVE_AFTER (10),
# MARGIN (15), DISK_MB (64), DISK_NAMING (symlink|mapper), DOMU_MEM (256),
# LOAD_OPS (2), LOAD_PARTS ("pv pvh"), LOAD_FIO (1), LOAD_FIO_MB (8),
# LOAD_GAP (5), LOAD_BLOCKS (4096), LOAD_PVH_BLOCKS (512), LOAD_PVH_RATE (50),
# LOAD_TIME (900), LOAD_MEM (256), LOAD_FINISH_TIMEOUT (300), FEAT_ORDER (2),
# FEAT_INDIRECT (blkfront's default), TD_DELAY (3), TD_WAIT (30), PERF_S (15),
# SELFTEST_TIMEOUT (300), RUST_LOG (info). XEN_REAL_BIN = --selftest-bin.
# XEN_ACCEL (qemu's -accel, default tcg) and XEN_CMDLINE_EXTRA (appended to
# Xen's command line) are for experiments with the emulation.
