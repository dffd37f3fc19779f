#!/bin/bash
# Real-Xen harness: boots Debian's Xen 4.17 under qemu (TCG) with a busybox
# dom0 and runs the stale-write scenarios of seeds/003 against the kernel's
# xen-blkback (negative control: the corruption must show) and against
# `blkshim xen-backend` (must stay clean).
#
#   qemu-harness/xen.sh [--backend blkback|blkshim|both] [--scenarios save,migrate,...]
#                       [--delay S] [--migrate-delay S] [--hook-delay S]
#                       [--blkshim PATH] [--blkshim-args 'ARGS'] [--timeout S]
#
# Scenarios (default: save,migrate on both back ends, hooked,destroy on blkshim):
#   save     PV domU, probe writing gens 1..5 on 8 blocks; gen 1 held by
#            dm-delay (--delay, 30 s) on the source path; xl save 10 s after
#            gen 1 + xl restore onto the undelayed path
#   migrate  the same with a PVH domU and a local `xl migrate` 5 s after gen
#            1 (--migrate-delay, default delay+10: the pre-copy takes 10-20 s)
#   hooked   (blkshim) save with --hook-delay and a destination hook that
#            writes blkshim-resume = wait into the new vbd's directory
#   destroy  (blkshim) `xl destroy` with writes held in dm-delay: the source's
#            hand-off record must appear, blkshim keep serving
#   load     fio verify in a PV domU under save/restores (LOAD_TYPE=pvh adds
#            local migrations, but fio in a PVH domU triple-faults under TCG)
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
TIMEOUT=${TIMEOUT:-1200}
BLKSHIM_ARGS=${BLKSHIM_ARGS:-}
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
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
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
trap 'say "interrupted"; exit 130' INT TERM
# The whole run is bounded: a watchdog signals this script at --timeout.
( sleep "$TIMEOUT" && { echo "xen.sh: overall timeout ${TIMEOUT}s" >&2; kill -TERM $$; } ) &
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
        for v in SAVE_AFTER MIGRATE_AFTER MARGIN DISK_MB DISK_NAMING DOMU_MEM LOAD_OPS LOAD_TYPE LOAD_MEM LOAD_FINISH_TIMEOUT RUST_LOG HOOK_VALUE; do
            [ -n "${!v:-}" ] && echo "$v='${!v}'"
        done
    } >"$R/etc/xh/run.conf"
    if [ "$be" = blkshim ]; then
        strip -o "$R/opt/blkshim/blkshim" "$BLKSHIM" 2>/dev/null || cp "$BLKSHIM" "$R/opt/blkshim/blkshim"
        local l
        for l in $(ldd "$BLKSHIM" | awk '/=> \//{print $3}'); do
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
    elif [ "$be" = blkshim ]; then all="save migrate hooked destroy"
    else all="save migrate"; fi
    for s in $all; do
        case "$s" in
        hooked | destroy) [ "$be" = blkshim ] || { say "skipping $s on $be (blkshim only)"; continue; } ;;
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
        load) t=$((t + 600)) ;;
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
show = ("XEN-LOG", "XEN-SCN", "XEN-DOM0READ", "XEN-DONE")
for raw in sys.stdin.buffer:
    t = time.time()
    line = raw.rstrip(b"\r\n").decode("utf-8", "replace").replace("\r", "")
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + ".%03d" % int((t % 1) * 1000)
    out.write("%s +%7.2f %s\n" % (stamp, t - t0, line)); out.flush()
    if line.startswith(show) or ("XEN-DOMU" in line and ("PROBE-RESULT" in line or "DOMU-FIO-FINAL" in line)) \
       or "(XEN) Panic" in line or "Kernel panic" in line:
        sys.stderr.write("  %s +%6.1f %s\n" % (stamp, t - t0, line[:300])); sys.stderr.flush()
'

boot() { # backend scenarios
    local be=$1 scns=$2 initrd est log=$WORKDIR/serial-$1.log rc
    initrd=$(mkrun "$be" "$scns")
    est=$(estimate "$scns")
    local append="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all console_timestamps=boot dom0_mem=1024M,max:1024M dom0_max_vcpus=2 noreboot"
    local modules="$IMG/vmlinuz console=hvc0 earlyprintk=xen rdinit=/init xh.backend=$be xh.scenarios=$scns,$initrd"
    local cmd=(qemu-system-x86_64 -accel tcg -machine pc -cpu qemu64,+svm,+npt -m 2048 -smp 2
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
for line in open(log, errors="replace"):
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) < 3: continue
    text = parts[2]
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
        res.append((s, "FAIL", "no result from dom0 (boot %s)" % ("ended" if done else "timed out or crashed"))); continue
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
        res.append((s, "PASS" if ok else "FAIL", ev + ("" if ok else " -- " + why) + (" record=" + kv["record"] if kv.get("record", "none") != "none" else "")))
    elif kv.get("op") == "destroy":
        ok = kv.get("armed") == "1" and kv.get("record_appeared") == "1" and kv.get("blkshim_alive") == "1" and kv.get("src_vbd_left") == "0"
        res.append((s, "PASS" if ok else "FAIL", ev + " record=" + kv.get("record", "none")))
    elif kv.get("op") == "load":
        fin = kv.get("final", "")
        ok = kv.get("ops_failed") == "0" and "rounds=0," not in fin and "rc=0" in fin and "verify_errors=0" in fin and "failed_rounds=0" in fin and kv.get("round_verify_errors_total") == "0"
        res.append((s, "PASS" if ok else "FAIL", ev))
    else:
        res.append((s, "FAIL", "unknown op " + str(kv)))
with open(os.path.join(wd, "results"), "a") as f:
    for s, r, ev in res:
        line = "XEN-RESULT %s %s %s %s" % (s, be, r, ev)
        print(line); f.write(line + "\n")
'

for be in $BACKENDS; do
    scns=$(scns_for "$be")
    [ -n "$scns" ] || continue
    boot "$be" "$scns"
    python3 -c "$JUDGEPY" "$WORKDIR" "$be" "$scns"
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
# LOAD_OPS (2), LOAD_TYPE (pv), LOAD_MEM (256), LOAD_FINISH_TIMEOUT (400), RUST_LOG (info).
