#!/bin/busybox sh
# /init of the real-Xen harness dom0 (see xen.sh): a busybox initramfs with
# xl, xenstored, xenconsoled, dmsetup, the domU images and (appended at run
# time by xen.sh) blkshim and /etc/xh/run.conf.
#
# It brings up the Xen control plane, then runs the scenarios named by
# xh.scenarios=a:b:c on the kernel command line (or SCENARIOS in run.conf)
# against back end xh.backend=blkback|blkshim, and powers off (Xen enters
# ACPI S5 and qemu exits). Every line the host parses starts with "XEN-":
#   XEN-LOG ...                progress, with dom0 uptime
#   XEN-DOMU <scn> <line>      the domU console (xenconsoled's log), relayed
#   XEN-BLKSHIM <line>         blkshim's log, relayed
#   XEN-DOM0READ <scn> ...     dom0's read of the probe blocks on the storage
#   XEN-SCN <scn> key=value... the scenario's evidence (the host judges it)
#   XEN-FILE <name> <line>     files for the host's workdir (xenstore
#                              snapshots and watch logs, xl -vvv logs, ...)
#   XEN-DONE                   all scenarios ran
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin:/opt/blkshim
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts # xenconsoled needs ptys ("console tty: timed out" otherwise)
mount -t tmpfs -o size=750M run /run # save files of the domU
mount -t tmpfs shm /dev/shm
mkdir -p /run/xh /run/lock /run/disks /var/lib /var/log/xen/console /var/lib/xen /var/lib/blkshim
ln -sfn /run /var/run
ln -sfn /run/lock /var/lock

up() { read -r u _ </proc/uptime; echo "$u"; }
log() { echo "XEN-LOG $(up) $*"; }
poweroff_now() {
    log "poweroff"
    echo "XEN-DONE"
    sync
    poweroff -f
    sleep 10
}

# Run parameters: /etc/xh/run.conf (from xen.sh), then xh.KEY=VALUE words of
# the kernel command line (KEY upper-cased).
[ -f /etc/xh/run.conf ] && . /etc/xh/run.conf
for word in $(cat /proc/cmdline); do
    case "$word" in
    xh.*=*)
        key=${word%%=*}; key=${key#xh.}; val=${word#*=}
        key=$(echo "$key" | tr a-z A-Z)
        eval "$key=\$val"
        ;;
    esac
done
BACKEND=${BACKEND:-blkback}
SCENARIOS=$(echo "${SCENARIOS:-save}" | tr ':,' '  ')
DELAY=${DELAY:-30}              # dm-delay of the source path's writes, seconds
HOOK_DELAY=${HOOK_DELAY:-60}    # ... for the hooked scenario
MIGRATE_DELAY=${MIGRATE_DELAY:-$((DELAY + 10))}  # migrate: the live pre-copy takes 10-20 s
SAVE_AFTER=${SAVE_AFTER:-10}    # save/destroy this many seconds after gen 1 was submitted
MIGRATE_AFTER=${MIGRATE_AFTER:-5}  # migrate: start this many seconds after gen 1
MARGIN=${MARGIN:-15}            # after the delay expired, before dom0 reads
DISK_MB=${DISK_MB:-64}
DISK_NAMING=${DISK_NAMING:-symlink}  # symlink: one path for both dm paths
DOMU_MEM=${DOMU_MEM:-256}
LOAD_OPS=${LOAD_OPS:-2}
BLKSHIM_ARGS=${BLKSHIM_ARGS:-}
XL=/usr/lib/xen-4.17/bin/xl
log "dom0 up: backend=$BACKEND scenarios='$SCENARIOS' delay=$DELAY migrate_delay=$MIGRATE_DELAY hook_delay=$HOOK_DELAY save_after=$SAVE_AFTER migrate_after=$MIGRATE_AFTER margin=$MARGIN naming=$DISK_NAMING blkshim_args='$BLKSHIM_ARGS'"
log "kernel $(uname -r) mem $(awk '/MemTotal/{print $2}' /proc/meminfo) kB cpus $(nproc)"

# ---- modules -------------------------------------------------------------
for m in $(cat /etc/modules.order); do
    case "$m" in
    */xen-blkback.ko) [ "$BACKEND" = blkback ] || { log "not loading xen-blkback (backend $BACKEND)"; continue; } ;;
    esac
    insmod "/lib/modules/$m" || log "WARN insmod $m failed"
done
mount -t xenfs xenfs /proc/xen || log "WARN mount xenfs failed"
log "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

# ---- Xen control plane -----------------------------------------------------
mkdir -p /run/xen /run/xenstored /var/lib/xen/dump /var/lib/xen/save
xenstored --pid-file /run/xenstored.pid || log "WARN xenstored exited $?"
i=0
until xenstore-read -s / >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 150 ] && { log "FATAL xenstored not answering"; poweroff_now; }
    sleep 0.2
done
xen-init-dom0 >/run/xh/xen-init-dom0.log 2>&1 || log "WARN xen-init-dom0 rc=$?"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest || log "WARN xenconsoled rc=$?"
log "control plane up"
$XL list 2>&1 | sed 's/^/XEN-LOG xl list: /'
$XL info 2>/dev/null | grep -E 'xen_version|total_memory|free_memory|virt_caps|xen_commandline' | sed 's/^/XEN-LOG xl info: /'

# ---- helpers ---------------------------------------------------------------
RELAYS=""
relay() { # prefix file: tail the file to the console; RELAY_PID = the relay
    (tail -n +1 -F "$2" 2>/dev/null | while IFS= read -r l; do echo "$1 $l"; done) &
    RELAY_PID=$!
    RELAYS="$RELAYS $RELAY_PID"
}
killtree() { # pid: the subshell and its children (tail, while)
    pkill -P "$1" 2>/dev/null
    kill "$1" 2>/dev/null
}
stop_relays() { # the domU relays (not blkshim's)
    for p in $RELAYS; do killtree "$p"; done
    RELAYS=""
}
dumpfile() { # name path [max bytes]
    [ -f "$2" ] || return 0
    head -c "${3:-300000}" "$2" | awk -v p="XEN-FILE $1" '{print p, $0}' # also ends an unterminated last line
}
waitlog() { # timeout_s pattern files... -> 0 when found
    local t=$1 pat=$2 n=0; shift 2
    while [ $n -lt $((t * 2)) ]; do
        cat "$@" 2>/dev/null | grep -q -- "$pat" && return 0
        [ -n "${WAIT_TF_ABOVE:-}" ] && [ $((n % 10)) = 0 ] && [ "$(tfcount)" -gt "$WAIT_TF_ABOVE" ] && return 2
        sleep 0.5; n=$((n + 1))
    done
    return 1
}
# Triple faults in Xen's log (PVH under TCG). Xen's console ring may wrap, so
# this only ends waits early; the host counts them for the verdict, from the
# whole serial log.
tfcount() { $XL dmesg 2>/dev/null | grep -c 'Triple fault'; }
xs_snap() { # scn tag
    local d
    {
        echo "# $(up) $2"
        xenstore-ls -f /local/domain/0/backend 2>&1
        for d in $($XL list 2>/dev/null | awk 'NR>2{print $2}'); do
            xenstore-ls -f /local/domain/$d/device 2>/dev/null
            xenstore-ls -f /local/domain/$d/control 2>/dev/null
        done
    } >>"/run/xh/xs-$1.txt"
}
WATCHPIDS=""
watch_start() { # scn: log every XenStore change under /local/domain, value read at once
    xen-xswatch /local/domain >>"/run/xh/watch-$1.txt" 2>&1 &
    WATCHPIDS="$WATCHPIDS $!"
}
watch_stop() {
    for p in $WATCHPIDS; do killtree "$p"; done
    WATCHPIDS=""
}
domains_gone() { # timeout: wait until only Domain-0 is left
    local n=0
    while [ $n -lt $(($1 * 2)) ]; do
        [ "$($XL list 2>/dev/null | awk 'NR>2' | wc -l)" -eq 0 ] && return 0
        sleep 0.5; n=$((n + 1))
    done
    return 1
}
gen_of() { # img block -> generation stamped there (0 = never written)
    local s
    s=$(dd if="$1" bs=4096 skip=$(($2 * 256)) count=1 2>/dev/null | head -c 16 | tr -c 'A-Za-z0-9 ' ' ')
    case "$s" in "GEN "*) set -- $s; echo "$2" ;; *) echo 0 ;; esac
}

BLKSHIM_PID=""
start_blkshim() {
    [ "$BACKEND" = blkshim ] || return 0
    if [ -n "$BLKSHIM_PID" ] && kill -0 "$BLKSHIM_PID" 2>/dev/null; then return 0; fi
    [ -n "$BLKSHIM_PID" ] && log "WARN blkshim (pid $BLKSHIM_PID) is gone; restarting"
    [ -x /opt/blkshim/blkshim ] || { log "FATAL no /opt/blkshim/blkshim"; poweroff_now; }
    RUST_LOG=${RUST_LOG:-info} /opt/blkshim/blkshim xen-backend --epoch-dir /var/lib/blkshim $BLKSHIM_ARGS \
        >>/run/xh/blkshim.log 2>&1 &
    BLKSHIM_PID=$!
    log "blkshim started pid $BLKSHIM_PID: xen-backend --epoch-dir /var/lib/blkshim $BLKSHIM_ARGS"
    if [ -z "$BLKSHIM_RELAY" ]; then
        relay XEN-BLKSHIM /run/xh/blkshim.log
        BLKSHIM_RELAY=$RELAY_PID; RELAYS="" # not stopped with the domU relays
    fi
    sleep 1
}

# Storage of one scenario: a file on tmpfs, a loop device, dm "slow" (writes
# delayed) and "fast" (linear) over it; /run/disks/<scn> names the path the
# guest uses (symlink naming: the same path, re-pointed from slow to fast
# before the restore/migration, so that blkshim, which names a disk by its
# `params` path, sees one disk).
LOOPN=0
mkdisk() { # scn delay_s
    local scn=$1 d=$2
    IMG=/run/xh/$scn.img
    rm -f "$IMG"
    dd if=/dev/zero of="$IMG" bs=1M count=$DISK_MB 2>/dev/null
    LOOP=/dev/loop$LOOPN; LOOPN=$((LOOPN + 1))
    losetup "$LOOP" "$IMG" || { log "ERROR losetup $LOOP"; return 1; }
    local S; S=$(blockdev --getsz "$LOOP")
    export DM_DISABLE_UDEV=1
    dmsetup create "$scn-slow" --table "0 $S delay $LOOP 0 0 $LOOP 0 ${d}000" || return 1
    dmsetup create "$scn-fast" --table "0 $S linear $LOOP 0" || return 1
    SLOW=/dev/mapper/$scn-slow; FAST=/dev/mapper/$scn-fast
    ln -sfn "$SLOW" "/run/disks/$scn"
    if [ "$DISK_NAMING" = symlink ]; then SRC_TARGET=/run/disks/$scn; DST_TARGET=/run/disks/$scn
    else SRC_TARGET=$SLOW; DST_TARGET=$FAST; fi
    log "$scn: disk $IMG on $LOOP, $SLOW (writes +${d}s) and $FAST; source target $SRC_TARGET, destination $DST_TARGET"
}
point_fast() { ln -sfn "$FAST" "/run/disks/$1"; log "$1: /run/disks/$1 -> $FAST"; }
rmdisk() {
    export DM_DISABLE_UDEV=1
    dmsetup remove "$1-slow" 2>/dev/null || log "WARN dmsetup remove $1-slow failed"
    dmsetup remove "$1-fast" 2>/dev/null || log "WARN dmsetup remove $1-fast failed"
    losetup -d "$LOOP" 2>/dev/null
    rm -f "$IMG"
}
disk_line() { # target [backend]: DISK_BE overrides $BACKEND (perf runs both)
    if [ "${DISK_BE:-$BACKEND}" = blkback ]; then
        echo "'format=raw,vdev=xvda,access=rw,backendtype=phy,script=/etc/xen/scripts/blk-min,target=$1'"
    else
        echo "'format=raw,vdev=xvda,access=rw,backendtype=phy,script=/bin/true,target=$1'"
    fi
}
mkcfg() { # file name type ramdisk extra target
    cat >"$1" <<EOF
name = "$2"
type = "$3"
memory = $DOMU_MEM
vcpus = ${VCPUS:-1}
kernel = "/root/domU/vmlinuz"
ramdisk = "/root/domU/$4"
extra = "console=hvc0 rdinit=/init $5"
disk = [ $(disk_line "$6") ]
on_crash = "preserve"
on_reboot = "${ON_REBOOT:-restart}"
EOF
}
xlrun() { # scn tag timeout args... : xl -vvv, log kept, duration printed
    local scn=$1 tag=$2 t=$3 t0 t1 rc; shift 3
    t0=$(up)
    echo "### $(up) xl $*" >>"/run/xh/xl-$scn.txt"
    timeout -s KILL "$t" $XL -vvv "$@" >>"/run/xh/xl-$scn.txt" 2>&1
    rc=$?
    t1=$(up)
    DUR=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")
    log "$scn: xl $tag rc=$rc in ${DUR}s"
    eval "T_$tag=$DUR; RC_$tag=$rc"
    return $rc
}
cleanup_domains() { # scn
    local d
    for d in $($XL list 2>/dev/null | awk 'NR>2{print $2}'); do
        timeout -s KILL 60 $XL destroy "$d" >/dev/null 2>&1
    done
    domains_gone 60 || { log "WARN domains left: $($XL list 2>&1 | awk 'NR>2' | tr '\n' ';')"; }
}
recsum() { cat /var/lib/blkshim/*$1*.handoff.json 2>/dev/null | md5sum | cut -c1-8; }
guest_logs() { echo /var/log/xen/console/guest-$1.log /var/log/xen/console/guest-$1--incoming.log; }

# ---- the race scenarios: save, migrate, hooked ------------------------------
# The probe stamps gens 1..5 on 8 blocks; gen 1 is held by dm-delay on the
# source path when the domain is saved or migrated; blkfront re-issues it on
# the destination (fast path), gens 2-5 complete there, then the source's
# delayed gen-1 writes land -- unless the back end kept them from doing so.
race() { # scn op(save|migrate) type delay hook(0|1)
    local scn=$1 op=$2 type=$3 d=$4 hook=$5
    local name=d-$scn settle=$(($4 + MARGIN + 10)) t_start; t_start=$(up)
    local HOOKPID="" armed=1
    T_create=""; T_save=""; T_restore=""; T_migrate=""
    log "=== scenario $scn: op=$op type=$type delay=$d hook=$hook settle=$settle"
    local tf0; tf0=$(tfcount)
    start_blkshim
    mkdisk "$scn" "$d" || { echo "XEN-SCN $scn error=storage"; return; }
    mkcfg /root/$scn.cfg "$name" "$type" probe.cpio.gz "xp.mode=probe xp.settle=$settle" "$SRC_TARGET"
    mkcfg /root/$scn-fast.cfg "$name" "$type" probe.cpio.gz "xp.mode=probe xp.settle=$settle" "$DST_TARGET"
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name--incoming.log
    xlrun "$scn" create 120 create /root/$scn.cfg || { echo "XEN-SCN $scn error=create"; cleanup_domains; rmdisk "$scn"; return; }
    if ! waitlog 180 'gen 1 submitted' $(guest_logs "$name"); then
        echo "XEN-SCN $scn error=probe-not-started"; stop_relays; cleanup_domains; rmdisk "$scn"; return
    fi
    local t_gen1; t_gen1=$(up)
    # A PVH boot that triple-faulted before this was restarted by Xen and never
    # ran the probe (the host's judge ignores those crashes); the probe's
    # domain is the one up now.
    local tf_gen1; tf_gen1=$(tfcount)
    local src; src=$($XL domid "$name")
    local after=$SAVE_AFTER; [ "$op" = migrate ] && after=$MIGRATE_AFTER
    log "$scn: gen 1 submitted (domid $src); $op in ${after}s"
    xs_snap "$scn" "running, before $op"
    watch_start "$scn"
    sleep "$after"
    if grep -q 'gen 1 completed' $(guest_logs "$name") 2>/dev/null; then
        log "WARN $scn: gen 1 completed before the $op started: the race is not armed"
    fi
    if [ "$hook" = 1 ]; then
        # The destination's migration hook: blkshim-resume = wait in the new
        # vbd's back-end directory as soon as it appears.
        xen-xswatch -hook "$src" -value "${HOOK_VALUE:-wait}" /local/domain/0/backend/vbd &
        HOOKPID=$!
    fi
    if [ "$op" = save ]; then
        xlrun "$scn" save 180 save "$name" "/run/xh/$scn.chk"
        xs_snap "$scn" "after save"
        [ "$DISK_NAMING" = symlink ] && point_fast "$scn"
        xlrun "$scn" restore 180 restore /root/$scn-fast.cfg "/run/xh/$scn.chk"
        rm -f "/run/xh/$scn.chk"
    else
        [ "$DISK_NAMING" = symlink ] && point_fast "$scn"
        xlrun "$scn" migrate 300 migrate -C /root/$scn-fast.cfg -s '' "$name" 'xl -vvv migrate-receive'
    fi
    local dst; dst=$($XL domid "$name" 2>/dev/null)
    xs_snap "$scn" "after $op (new domid $dst)"
    log "$scn: source domid $src, destination domid $dst; $($XL list 2>&1 | awk 'NR>2{print $1"/"$2"/"$5}' | tr '\n' ' ')"
    [ -n "$HOOKPID" ] && kill "$HOOKPID" 2>/dev/null
    # Wait for the delayed writes to have landed, then read the storage; and
    # at least MARGIN s after the save/migration returned (a slow live
    # migration can end after gen 1 + delay + margin).
    local tend; tend=$(awk "BEGIN{a = $t_gen1 + $d + $MARGIN; b = $(up) + $MARGIN; print (a > b ? a : b)}")
    while [ "$(awk "BEGIN{print ($(up) < $tend)}")" = 1 ]; do sleep 1; done
    # The probe's domain crashing after gen 1 makes the run INVALID: no need
    # to wait out the probe's settle time for a result that cannot count.
    local probe_wait=$((settle + 60))
    if [ "$(tfcount)" -gt "$tf_gen1" ]; then
        log "WARN $scn: a guest triple-faulted after the probe started: INVALID run, not waiting for PROBE-RESULT"
        probe_wait=5
    fi
    xs_snap "$scn" "delay expired"
    local gens="" b=0 g
    while [ $b -lt 8 ]; do
        g=$(gen_of "$IMG" $b); gens="$gens${gens:+,}$g"
        echo "XEN-DOM0READ $scn block $b gen $g"
        b=$((b + 1))
    done
    WAIT_TF_ABOVE=$tf_gen1
    waitlog $probe_wait 'PROBE-RESULT' $(guest_logs "$name") || log "WARN $scn: no PROBE-RESULT"
    WAIT_TF_ABOVE=
    sleep 1
    local res completed
    res=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep 'PROBE-RESULT' | tail -1 | sed 's/.*PROBE-RESULT //; s/ /,/g')
    completed=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep -o 'gen [0-9]* completed' | awk '{print $2}' | sort -n | tail -1)
    # Armed: the domain was suspended (the probe sees its clock jump) while
    # the gen-1 writes were in flight, i.e. held by dm-delay on the source.
    local susp; susp=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep -o 'SUSPENDED #1 .*' | head -1)
    case "$susp" in *"with gen 1: "[1-9]*) armed=1 ;; *) armed=0; log "WARN $scn: race not armed: ${susp:-no suspend seen by the probe}" ;; esac
    local stale=0
    for g in $(echo "$gens" | tr ',' ' '); do [ "$g" -lt "${completed:-0}" ] && stale=$((stale + 1)); done
    watch_stop
    local rec=""
    if [ "$BACKEND" = blkshim ]; then
        for f in /var/lib/blkshim/*$scn*.handoff.json; do
            [ -f "$f" ] || continue
            echo "XEN-LOG $scn: record $f: $(tr -d ' \n' <"$f" | head -c 600)"
            rec=$(tr -d ' \n' <"$f" | head -c 300)
            dumpfile "record-$scn.json" "$f"
        done
    fi
    # A guest that crashed (PVH under TCG triple-faults now and then) and
    # rebooted ran the probe again: the run proves nothing.
    local boots tf; boots=$(cat $(guest_logs "$name") 2>/dev/null | grep -c 'DOMU-BOOTED')
    tf=$(($(tfcount) - tf_gen1))
    [ "$tf" -gt 0 ] && log "WARN $scn: $tf triple fault(s) of a guest in Xen's log after the probe started"
    echo "XEN-SCN $scn backend=$BACKEND op=$op type=$type delay=$d after=$after hook=$hook domu_boots=$boots boot_triple_faults=$((tf_gen1 - tf0)) triple_faults=$tf armed=$armed suspend=$(echo "${susp:-none}" | tr ' ' '_' | head -c 80) probe=${res:-none} completed=${completed:-0} dom0_gens=$gens stale_blocks=$stale src=$src dst=${dst:-none} create_s=$T_create save_s=$T_save restore_s=$T_restore migrate_s=$T_migrate rc_op=${RC_save:-}${RC_migrate:-}/${RC_restore:-} elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}") record=${rec:-none}"
    RC_save=""; RC_migrate=""; RC_restore=""
    cleanup_domains
    stop_relays
    rmdisk "$scn"
}

# ---- destroy (blkshim): the source destroyed with writes held in dm-delay ----
destroy_scn() { # scn delay
    local scn=$1 d=$2 name=d-$1 t_start; t_start=$(up)
    log "=== scenario $scn: destroy mid-I/O, delay=$d"
    start_blkshim
    mkdisk "$scn" "$d" || { echo "XEN-SCN $scn error=storage"; return; }
    mkcfg /root/$scn.cfg "$name" pv probe.cpio.gz "xp.mode=probe xp.settle=$((d + 60))" "$SRC_TARGET"
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    xlrun "$scn" create 120 create /root/$scn.cfg || { echo "XEN-SCN $scn error=create"; cleanup_domains; rmdisk "$scn"; return; }
    local src; src=$($XL domid "$name")
    waitlog 180 'gen 1 submitted' $(guest_logs "$name") || { echo "XEN-SCN $scn error=probe-not-started"; stop_relays; cleanup_domains; rmdisk "$scn"; return; }
    sleep "$SAVE_AFTER"
    local armed=1
    grep -q 'gen 1 completed' $(guest_logs "$name") && armed=0
    # blkshim names the disk from the path (how exactly is its business): its
    # record is the *.handoff.json whose name contains the scenario's name.
    local before; before=$(recsum "$scn")
    xs_snap "$scn" "before destroy"
    watch_start "$scn"
    xlrun "$scn" destroy 120 destroy "$name"
    local t_d; t_d=$(up)
    xs_snap "$scn" "after destroy"
    local n=0 appeared=0 t_rec=""
    while [ $n -lt $(((d + MARGIN) * 2)) ]; do
        if [ "$(recsum "$scn")" != "$before" ]; then
            appeared=1; t_rec=$(awk "BEGIN{printf \"%.1f\", $(up) - $t_d}"); break
        fi
        sleep 0.5; n=$((n + 1))
    done
    sleep 1
    xs_snap "$scn" "end"
    watch_stop
    local alive=0; kill -0 "$BLKSHIM_PID" 2>/dev/null && alive=1
    local vbds; vbds=$(xenstore-list /local/domain/0/backend/vbd 2>/dev/null | tr '\n' ',')
    local left=0; xenstore-exists "/local/domain/0/backend/vbd/$src" 2>/dev/null && left=1
    local rec=none recf
    for recf in /var/lib/blkshim/*$scn*.handoff.json; do
        [ -f "$recf" ] || continue
        rec=$(tr -d ' \n' <"$recf" | head -c 400)
        dumpfile "record-$scn.json" "$recf"
    done
    echo "XEN-SCN $scn backend=$BACKEND op=destroy delay=$d armed=$armed record_appeared=$appeared record_after_s=${t_rec:-none} blkshim_alive=$alive src_vbd_left=$left vbds=${vbds:-none} destroy_s=$T_destroy elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}") record=$rec"
    cleanup_domains
    stop_relays
    rmdisk "$scn"
}

# ---- helpers of the newer scenarios -----------------------------------------
guest_grep() { # name pattern: last matching line of the domain's console logs, \r stripped
    cat $(guest_logs "$1") 2>/dev/null | tr -d '\r' | grep -- "$2" | tail -1
}
bk_threads() { # blkshim's threads by name (io_uring workers left out): name*count,...
    [ -n "$BLKSHIM_PID" ] || { echo none; return; }
    cat /proc/$BLKSHIM_PID/task/*/comm 2>/dev/null | tr ' ' '_' | grep -v '^iou-' | sort | uniq -c |
        awk '{printf "%s%s*%s", (NR > 1 ? "," : ""), $2, $1}'
}
bk_vbd_threads() { # threads named vbd-* or ring-*
    cat /proc/$BLKSHIM_PID/task/*/comm 2>/dev/null | grep -c -E '^(vbd|ring)-'
}
bk_maps() { # blkshim's mappings of /dev/xen/gntdev (grant maps)
    awk '/\/dev\/xen\/gntdev/{n++} END{print n + 0}' /proc/$BLKSHIM_PID/maps 2>/dev/null
}
kv_line() { # "a=1 b=2" -> the value of key $2
    echo "$1" | tr ' ' '\n' | grep "^$2=" | head -1 | cut -d= -f2-
}

# ---- selftest (blkshim): tests/xen_real in this dom0, before the daemon ------
# The test binary (cargo test --features xen --test xen_real) creates its own
# vbds under backend/vbd/0/519xx and plays their frontend with gntalloc pages
# and a loopback event channel: a running daemon or blkback would grab them.
selftest_scn() {
    local scn=selftest t_start; t_start=$(up)
    log "=== scenario $scn: tests/xen_real in dom0 (BLKSHIM_REQUIRE_XEN=1), no daemon running"
    if [ -n "$BLKSHIM_PID" ] && kill -0 "$BLKSHIM_PID" 2>/dev/null; then
        echo "XEN-SCN $scn backend=$BACKEND op=selftest error=daemon-already-running"; return
    fi
    [ -x /opt/blkshim/xen_real ] || { echo "XEN-SCN $scn backend=$BACKEND op=selftest error=no-test-binary"; return; }
    grep -q '^xen_gntalloc ' /proc/modules || log "WARN $scn: xen-gntalloc is not loaded"
    mkdir -p /tmp/selftest
    xs_snap "$scn" "before"
    (cd /tmp/selftest && TMPDIR=/tmp/selftest BLKSHIM_REQUIRE_XEN=1 RUST_LOG=${RUST_LOG:-info} RUST_BACKTRACE=1 \
        timeout -s KILL "${SELFTEST_TIMEOUT:-300}" /opt/blkshim/xen_real --test-threads=1 >/run/xh/selftest.txt 2>&1)
    local rc=$?
    xs_snap "$scn" "after"
    sed 's/^/XEN-SELFTEST /' /run/xh/selftest.txt | head -c 200000; echo
    local sum failed_tests left
    sum=$(grep 'test result:' /run/xh/selftest.txt | tail -1)
    failed_tests=$(grep -E '^test .* \.\.\. FAILED' /run/xh/selftest.txt | awk '{print $2}' | tr '\n' ',')
    left=$(xenstore-list /local/domain/0/backend/vbd/0 2>/dev/null | tr '\n' ',')
    echo "XEN-SCN $scn backend=$BACKEND op=selftest rc=$rc passed=$(echo "$sum" | grep -o '[0-9]* passed' | cut -d' ' -f1) failed=$(echo "$sum" | grep -o '[0-9]* failed' | cut -d' ' -f1) summary=$(echo "${sum:-none}" | tr ' ;' '_,' | head -c 200) failed_tests=${failed_tests:-none} left_vbds=${left:-none} elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}")"
}

# ---- load: the load probe (and fio in PV) under save/restores and migrations -
# Part pv: a PV domU (fio image) runs xen-loadprobe on the first 16 MiB and
# fio randwrite+crc32c verify rounds on the next 16 MiB while dom0 does
# LOAD_OPS save/restores. Part pvh: a PVH domU (probe image: fio
# triple-faults in PVH under TCG) runs xen-loadprobe while dom0 does
# LOAD_OPS local live migrations. Undelayed path. Each part then writes
# data/xh-stop; the probe drains and verifies every block.
load_part() { # scn part(pv|pvh) -> LP_* variables
    local scn=$1 part=$2 name=d-$1-$2 i=1 ops="" fails=0 img=probe.cpio.gz extra=""
    LP_ops=""; LP_fails=0; LP_result=none; LP_susp=0; LP_fio=none; LP_boots=0
    if [ "$part" = pv ] && [ "${LOAD_FIO:-1}" = 1 ]; then
        img=fio.cpio.gz
        extra="rootfstype=ramfs xp.fio=1 xp.fio_offset=16m xp.fio_size=${LOAD_FIO_MB:-8}m xp.iodepth=8"
    fi
    # PVH under TCG triple-faults under a busy disk (fio, or this probe
    # unthrottled): there the probe is rate-limited (LOAD_PVH_RATE IOPS).
    local blocks=${LOAD_BLOCKS:-4096}
    [ "$part" = pvh ] && { extra="xp.rate=${LOAD_PVH_RATE:-50}"; blocks=${LOAD_PVH_BLOCKS:-512}; }
    local mem=$DOMU_MEM; DOMU_MEM=${LOAD_MEM:-256}
    ON_REBOOT=destroy # a crashed guest must not come back as a new domain
    mkcfg /root/$name.cfg "$name" "$part" "$img" "xp.mode=load xp.blocks=$blocks xp.depth=16 xp.time=${LOAD_TIME:-900} $extra" "$LOAD_TGT"
    ON_REBOOT=""
    DOMU_MEM=$mem
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name--incoming.log
    # A PVH guest under TCG sometimes triple-faults while booting (Xen
    # dumps a garbage context); it is destroyed (on_reboot) and created
    # again, up to LOAD_BOOT_TRIES times.
    local try=1 started=0
    LP_tries=0
    while [ $try -le "${LOAD_BOOT_TRIES:-3}" ] && [ $started = 0 ]; do
        LP_tries=$try
        xlrun "$scn" create 120 create /root/$name.cfg || { LP_fails=1; LP_result=create-failed; cleanup_domains; return; }
        local n=0
        while [ $n -lt 480 ]; do
            if cat $(guest_logs "$name") 2>/dev/null | grep -q 'LOAD-STATUS'; then started=1; break; fi
            $XL domid "$name" >/dev/null 2>&1 || break
            sleep 0.5; n=$((n + 1))
        done
        if [ $started = 0 ]; then
            log "WARN $scn/$part: the domU died or hung before its load started (try $try)"
            cleanup_domains
            rm -f $(guest_logs "$name")
            try=$((try + 1))
        fi
    done
    if [ $started = 0 ]; then LP_fails=1; LP_result=load-not-started; return; fi
    while [ $i -le "$LOAD_OPS" ]; do
        sleep "${LOAD_GAP:-5}"
        if [ "$part" = pv ]; then
            if xlrun "$scn" save 180 save "$name" "/run/xh/$name.chk"; then
                xlrun "$scn" restore 180 restore "/run/xh/$name.chk" || fails=$((fails + 1))
            else
                fails=$((fails + 1))
            fi
            rm -f "/run/xh/$name.chk"
            ops="$ops${ops:+,}save+restore:${T_save}+${T_restore}s"
        else
            xlrun "$scn" migrate 300 migrate -s '' "$name" 'xl -vvv migrate-receive' || fails=$((fails + 1))
            ops="$ops${ops:+,}migrate:${T_migrate}s"
        fi
        xs_snap "$scn" "$part after op $i"
        i=$((i + 1))
    done
    sleep "${LOAD_GAP:-5}"
    local id; id=$($XL domid "$name" 2>/dev/null)
    xenstore-write "/local/domain/$id/data/xh-stop" 1 || log "WARN $scn: cannot write data/xh-stop for domid $id"
    log "$scn/$part: ops done ($ops; $fails failed); told domid $id to stop"
    waitlog "${LOAD_FINISH_TIMEOUT:-300}" 'DOMU-LOAD-DONE' $(guest_logs "$name") || log "WARN $scn/$part: no DOMU-LOAD-DONE"
    sleep 1
    LP_result=$(guest_grep "$name" 'LOAD-RESULT' | sed 's/.*LOAD-RESULT //; s/ /,/g')
    LP_susp=$(cat $(guest_logs "$name") 2>/dev/null | grep -c 'LOAD-SUSPENDED')
    LP_suspinfo=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep -o 'LOAD-SUSPENDED.*' | sed 's/LOAD-SUSPENDED #[0-9]* for \([0-9.]*\) s with \([0-9]*\) writes and \([0-9]*\) reads in flight/\1s:\2w+\3r/' | tr '\n' ',')
    if [ "$img" = fio.cpio.gz ]; then
        LP_fio=$(guest_grep "$name" 'DOMU-FIO-FINAL' | sed 's/.*DOMU-FIO-FINAL //; s/ /,/g')
        local rerr; rerr=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep 'DOMU-FIO-ROUND .* end' | grep -o 'verify_errors=[0-9]*' | awk -F= '{s+=$2} END{print s+0}')
        LP_fio="${LP_fio:-none},round_errors=$rerr"
    fi
    LP_boots=$(cat $(guest_logs "$name") 2>/dev/null | grep -c 'DOMU-BOOTED')
    [ "${LP_boots:-0}" -gt 1 ] && { fails=$((fails + 1)); log "WARN $scn/$part: the domU booted $LP_boots times"; }
    LP_ops=$ops; LP_fails=$fails
    cleanup_domains
}
load_scn() { # scn
    local scn=$1 t_start; t_start=$(up)
    local parts=${LOAD_PARTS:-pv pvh} part out=""
    log "=== scenario $scn: load probe under $LOAD_OPS save/restores (PV, + fio) and $LOAD_OPS local migrations (PVH)"
    start_blkshim
    mkdisk "$scn" 0 || { echo "XEN-SCN $scn error=storage"; return; }
    point_fast "$scn"
    LOAD_TGT=/run/disks/$scn; [ "$DISK_NAMING" = symlink ] || LOAD_TGT=$FAST
    watch_start "$scn"
    local fails=0
    for part in $(echo "$parts" | tr ',' ' '); do
        load_part "$scn" "$part"
        fails=$((fails + LP_fails))
        out="$out ${part}_ops=${LP_ops:-none} ${part}_result=${LP_result:-none} ${part}_suspends=$LP_susp ${part}_suspended=${LP_suspinfo:-none} ${part}_boots=$LP_boots ${part}_create_tries=$LP_tries"
        [ "$part" = pv ] && [ "$LP_fio" != none ] && out="$out pv_fio=$LP_fio"
    done
    # Every domain is gone now: nothing of theirs may be left in XenStore or
    # in blkshim (vbd/ring threads, grant mappings); 15 s to settle.
    local n=0 left vt maps
    while :; do
        left=$(xenstore-list /local/domain/0/backend/vbd 2>/dev/null | tr '\n' ',')
        vt=0; maps=0
        if [ "$BACKEND" = blkshim ]; then vt=$(bk_vbd_threads); maps=$(bk_maps); fi
        [ -z "$left" ] && [ "$vt" = 0 ] && [ "$maps" = 0 ] && break
        [ $n -ge 30 ] && break
        sleep 0.5; n=$((n + 1))
    done
    if [ -n "$left" ]; then
        xenstore-ls -f /local/domain/0/backend/vbd >"/run/xh/load-leftover.txt" 2>&1
        log "WARN $scn: left in XenStore: $(head -c 600 /run/xh/load-leftover.txt | tr '\n' ';')"
    fi
    watch_stop
    echo "XEN-SCN $scn backend=$BACKEND op=load parts=$(echo $parts | tr ' ' ',') load_ops=$LOAD_OPS ops_failed=$fails$out left_vbds=${left:-none} vbd_threads_left=$vt gntdev_maps_left=$maps threads_after=$(bk_threads) elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}")"
    stop_relays
    rmdisk "$scn"
}

# ---- features: what blkfront negotiates with the back end, and uses ---------
features_scn() { # scn
    local scn=$1 name=d-$1 t_start; t_start=$(up)
    log "=== scenario $scn: vcpus=2, blkfront max_ring_page_order=2: indirect, discard, flush, multi-queue"
    start_blkshim
    mkdisk "$scn" 0 || { echo "XEN-SCN $scn error=storage"; return; }
    point_fast "$scn"
    local tgt=/run/disks/$scn; [ "$DISK_NAMING" = symlink ] || tgt=$FAST
    # blkfront's own max_indirect_segments (32) unless FEAT_INDIRECT: with
    # persistent grants it preallocates (segments + 1) x ring size x queues
    # pages; 256 segments x 128 x 2 is 257 MB, more than the domU has (its
    # insmod then never returns).
    VCPUS=2
    mkcfg /root/$scn.cfg "$name" pv probe.cpio.gz "xp.mode=features xp.blkfront=max_ring_page_order=${FEAT_ORDER:-2}${FEAT_INDIRECT:+,max_indirect_segments=$FEAT_INDIRECT}" "$tgt"
    VCPUS=1
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    watch_start "$scn"
    xlrun "$scn" create 120 create /root/$scn.cfg || { echo "XEN-SCN $scn error=create"; watch_stop; cleanup_domains; stop_relays; rmdisk "$scn"; return; }
    local id; id=$($XL domid "$name")
    local fe=/local/domain/$id/device/vbd/51712 be=/local/domain/0/backend/vbd/$id/51712
    waitlog 240 'DOMU-FEAT-DONE' $(guest_logs "$name") || log "WARN $scn: no DOMU-FEAT-DONE"
    xs_snap "$scn" "workload done"
    local x k ev=""
    for k in multi-queue-num-queues ring-page-order feature-persistent; do
        x=$(xenstore-read "$fe/$k" 2>/dev/null); ev="$ev fe_$(echo $k | tr '-' '_')=${x:-absent}"
    done
    for k in feature-max-indirect-segments feature-discard feature-flush-cache feature-persistent max-ring-page-order multi-queue-max-queues discard-secure; do
        x=$(xenstore-read "$be/$k" 2>/dev/null); ev="$ev be_$(echo $k | tr '-' '_')=${x:-absent}"
    done
    local sysfs; sysfs=$(guest_grep "$name" 'DOMU-FEAT-SYSFS' | sed 's/.*DOMU-FEAT-SYSFS //')
    ev="$ev sysfs_max_segments=$(kv_line "$sysfs" max_segments) sysfs_max_hw_sectors_kb=$(kv_line "$sysfs" max_hw_sectors_kb) sysfs_discard_max_bytes=$(kv_line "$sysfs" discard_max_bytes) sysfs_write_cache=$(kv_line "$sysfs" write_cache) sysfs_hw_queues=$(kv_line "$sysfs" hw_queues) domu_cpus=$(kv_line "$sysfs" cpus)"
    local ind dis fl mq
    ind=$(guest_grep "$name" 'DOMU-FEAT indirect' | sed 's/.*DOMU-FEAT indirect //; s/ /,/g')
    dis=$(guest_grep "$name" 'DOMU-FEAT discard' | sed 's/.*DOMU-FEAT discard //' | cut -d' ' -f1-2 | tr ' ' ',')
    fl=$(guest_grep "$name" 'DOMU-FEAT flush' | sed 's/.*DOMU-FEAT flush //; s/ /,/g')
    mq=$(guest_grep "$name" 'DOMU-FEAT mq' | sed 's/.*DOMU-FEAT mq //; s/ /,/g')
    ev="$ev domu_indirect=${ind:-none} domu_discard=${dis:-none} domu_flush=${fl:-none} domu_mq=${mq:-none}"
    # Stop the domain cleanly: blkfront closes, the rings stop and log their counts.
    xlrun "$scn" shutdown 90 shutdown -w "$name" || log "WARN $scn: xl shutdown failed"
    domains_gone 30 || cleanup_domains
    local conn rings=""
    if [ "$BACKEND" = blkshim ]; then
        waitlog 15 "ring $be#0: stopped after" /run/xh/blkshim.log || log "WARN $scn: no ring statistics in blkshim's log"
        sleep 1
        conn=$(grep "vbd $be: Connected (" /run/xh/blkshim.log | tail -1 | sed 's/.*Connected (//; s/ ring(s)//; s/).*//; s/order //; s/persistent=//; s/epoch //; s/ //g')
        local l
        # ring <be>#i: stopped after N requests (read r, write w, flush f,
        # discard d, indirect i, refused x; B read, B written; P persistent grants)
        rings=$(grep "ring $be#[0-9]*: stopped after" /run/xh/blkshim.log | sed 's/.*#\([0-9]*\): stopped after/\1/' |
            sed 's/[^0-9]\{1,\}/ /g' | awk '{printf "%s%s:%s:%s:%s:%s:%s:%s:%s:%s:%s:%s", (NR > 1 ? ";" : ""), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11}')
    fi
    xs_snap "$scn" "after shutdown"
    watch_stop
    echo "XEN-SCN $scn backend=$BACKEND op=features domid=$id$ev connected=${conn:-none} rings=${rings:-none} shutdown_s=${T_shutdown:-none} elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}")"
    cleanup_domains
    stop_relays
    rmdisk "$scn"
}

# ---- teardown (blkshim): nothing left after xl destroy / xl shutdown ---------
td_check() { # domid base_threads base_maps timeout_s -> 0 when everything is back; TD_* set
    local id=$1 bt=$2 bm=$3 t=$4 n=0 t0; t0=$(up)
    while :; do
        TD_vbd=0; xenstore-exists "/local/domain/0/backend/vbd/$id" 2>/dev/null && TD_vbd=1
        TD_dom=0; xenstore-exists "/local/domain/$id" 2>/dev/null && TD_dom=1
        TD_null=$($XL list 2>/dev/null | grep -c '(null)')
        TD_doms=$($XL list 2>/dev/null | awk 'NR > 2' | wc -l)
        TD_threads=$(bk_threads); TD_maps=$(bk_maps); TD_vt=$(bk_vbd_threads)
        TD_s=$(awk "BEGIN{printf \"%.1f\", $(up) - $t0}")
        if [ "$TD_vbd" = 0 ] && [ "$TD_dom" = 0 ] && [ "$TD_null" = 0 ] && [ "$TD_doms" = 0 ] &&
            [ "$TD_threads" = "$bt" ] && [ "$TD_maps" = "$bm" ] && [ "$TD_vt" = 0 ]; then
            return 0
        fi
        [ $n -ge $((t * 2)) ] && return 1
        sleep 0.5; n=$((n + 1))
    done
}
teardown_scn() { # scn
    local scn=$1 t_start; t_start=$(up)
    log "=== scenario $scn: xl destroy mid-I/O (writes held ${TD_DELAY:-3}s), then xl shutdown; nothing may be left"
    start_blkshim
    mkdisk "$scn" "${TD_DELAY:-3}" || { echo "XEN-SCN $scn error=storage"; return; }
    watch_start "$scn"
    sleep 1
    # Back ends of earlier scenarios' vbds may still be finishing their
    # hand-off (waiting for writes dm-delay holds): let them, so the base
    # has no vbd threads; one that never finishes is a leak, named here.
    local w=0
    while [ "$(bk_vbd_threads)" != 0 ] && [ $w -lt 180 ]; do sleep 0.5; w=$((w + 1)); done
    local prior_left; prior_left=$(bk_vbd_threads)
    log "$scn: vbd threads of earlier scenarios: $prior_left left after waiting $((w / 2))s"
    if [ "$prior_left" != 0 ]; then
        local t
        for t in $(cat /proc/$BLKSHIM_PID/task/*/comm 2>/dev/null | grep -E '^vbd-' | sort -u); do
            log "$scn: leaked $t; blkshim's last words on it: $(grep "vbd/$(echo "$t" | cut -d- -f3)/$(echo "$t" | cut -d- -f2)" /run/xh/blkshim.log | tail -2 | tr '\n' '|')"
        done
    fi
    local bt bm; bt=$(bk_threads); bm=$(bk_maps)
    log "$scn: blkshim before: threads $bt; gntdev maps $bm"
    local ev="" ok=1 name id during_t during_m
    # 1. destroy with the load running, its writes held in dm-delay.
    name=d-$scn-destroy
    mkcfg /root/$name.cfg "$name" pv probe.cpio.gz "xp.mode=load xp.time=900 xp.status_s=2" "$SLOW"
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    if xlrun "$scn" create 120 create /root/$name.cfg && waitlog 240 'LOAD-STATUS' $(guest_logs "$name"); then
        id=$($XL domid "$name"); sleep 3
        during_t=$(bk_threads); during_m=$(bk_maps)
        local inflight; inflight=$(guest_grep "$name" 'LOAD-STATUS' | grep -o 'inflight=[0-9/]*' | cut -d= -f2)
        xs_snap "$scn" "before destroy"
        xlrun "$scn" destroy 120 destroy "$name"
        if td_check "$id" "$bt" "$bm" "${TD_WAIT:-30}"; then r=ok; else r=LEFT; ok=0; fi
        ev="$ev destroy=$r destroy_s=$T_destroy destroy_inflight=${inflight:-none} during_threads=$during_t during_maps=$during_m after_threads=$TD_threads after_maps=$TD_maps vbd_threads_left=$TD_vt vbd_node_left=$TD_vbd dom_node_left=$TD_dom null_domains=$TD_null clean_after_s=$TD_s"
        xs_snap "$scn" "after destroy"
    else
        ok=0; ev="$ev destroy=create-or-load-failed"
    fi
    cleanup_domains
    # 2. a clean xl shutdown after the load stopped.
    name=d-$scn-shutdown
    mkcfg /root/$name.cfg "$name" pv probe.cpio.gz "xp.mode=load xp.time=900 xp.status_s=2" "$FAST"
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    if xlrun "$scn" create 120 create /root/$name.cfg && waitlog 240 'LOAD-STATUS' $(guest_logs "$name"); then
        id=$($XL domid "$name"); sleep 3
        during_t=$(bk_threads); during_m=$(bk_maps)
        xenstore-write "/local/domain/$id/data/xh-stop" 1
        waitlog 120 'DOMU-LOAD-DONE' $(guest_logs "$name") || log "WARN $scn: no DOMU-LOAD-DONE"
        local res; res=$(guest_grep "$name" 'LOAD-RESULT' | sed 's/.*LOAD-RESULT //; s/ /,/g')
        xs_snap "$scn" "before shutdown"
        xlrun "$scn" shutdown 90 shutdown -w "$name" || ok=0
        if td_check "$id" "$bt" "$bm" "${TD_WAIT:-30}"; then r=ok; else r=LEFT; ok=0; fi
        case "$res" in CLEAN*) ;; *) ok=0 ;; esac
        ev="$ev shutdown=$r shutdown_rc=$RC_shutdown shutdown_s=$T_shutdown load=${res:-none} sd_during_threads=$during_t sd_during_maps=$during_m sd_after_threads=$TD_threads sd_after_maps=$TD_maps sd_vbd_threads_left=$TD_vt sd_vbd_node_left=$TD_vbd sd_dom_node_left=$TD_dom sd_null_domains=$TD_null sd_clean_after_s=$TD_s"
        xs_snap "$scn" "after shutdown"
    else
        ok=0; ev="$ev shutdown=create-or-load-failed"
    fi
    local alive=0; kill -0 "$BLKSHIM_PID" 2>/dev/null && alive=1
    [ $alive = 1 ] || ok=0
    watch_stop
    [ "$prior_left" = 0 ] || ok=0
    echo "XEN-SCN $scn backend=$BACKEND op=teardown ok=$ok blkshim_alive=$alive prior_vbd_threads=$prior_left prior_wait_s=$((w / 2)) base_threads=$bt base_maps=$bm$ev elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}")"
    cleanup_domains
    stop_relays
    rmdisk "$scn"
}

# ---- perf: domU fio against blkshim and xen-blkback in this dom0 -------------
perf_one() { # scn backend -> PERF_RES (job:iops:kibs,...)
    local scn=$1 be=$2 name=d-$1-$2
    DISK_BE=$be
    mkcfg /root/$name.cfg "$name" pv fio.cpio.gz "rootfstype=ramfs xp.mode=perf xp.perf_s=${PERF_S:-15}" "/run/disks/$scn"
    DISK_BE=""
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    PERF_RES=none
    xlrun "$scn" create 120 create /root/$name.cfg || { PERF_RES=create-failed; return; }
    waitlog $((PERF_S * 3 + 200)) 'DOMU-PERF-DONE' $(guest_logs "$name") || log "WARN $scn/$be: no DOMU-PERF-DONE"
    sleep 1
    PERF_RES=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep -o 'DOMU-PERF [a-z0-9]* .*' | awk '{
        v = ""; for (i = 3; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        iops = f["write_iops"] + f["read_iops"]; kib = f["write_kibs"] + f["read_kibs"]
        printf "%s%s:%s:%s:rc%s", (NR > 1 ? "," : ""), $2, iops, kib, f["rc"] }')
    cleanup_domains
}
perf_scn() { # scn
    local scn=$1 t_start; t_start=$(up)
    PERF_S=${PERF_S:-15}
    log "=== scenario $scn: fio 4k randwrite/randread qd16 and 1M write, ${PERF_S}s each, blkshim then xen-blkback"
    mkdisk "$scn" 0 || { echo "XEN-SCN $scn error=storage"; return; }
    point_fast "$scn"
    local out=""
    if [ "$BACKEND" = blkshim ]; then
        start_blkshim
        perf_one "$scn" blkshim; out="$out blkshim=$PERF_RES"
        # The same dom0 and storage, now with the kernel's back end.
        kill "$BLKSHIM_PID" 2>/dev/null; sleep 2; kill -9 "$BLKSHIM_PID" 2>/dev/null; BLKSHIM_PID=""
        local ko; ko=$(grep 'xen-blkback.ko' /etc/modules.order | head -1)
        insmod "/lib/modules/$ko" || log "WARN $scn: insmod xen-blkback failed"
        perf_one "$scn" blkback; out="$out blkback=$PERF_RES"
        rmmod xen_blkback 2>/dev/null || log "WARN $scn: rmmod xen_blkback failed"
    else
        perf_one "$scn" blkback; out="$out blkback=$PERF_RES"
    fi
    echo "XEN-SCN $scn backend=$BACKEND op=perf perf_s=$PERF_S$out elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}")"
    stop_relays
    rmdisk "$scn"
}

# selftest first (no daemon may run yet), perf last (it stops the daemon).
ordered=""
for scn in $SCENARIOS; do [ "$scn" = selftest ] && ordered="selftest"; done
for scn in $SCENARIOS; do case "$scn" in selftest | perf) ;; *) ordered="$ordered $scn" ;; esac; done
for scn in $SCENARIOS; do [ "$scn" = perf ] && ordered="$ordered perf"; done
log "running: $ordered"
for scn in $ordered; do
    case "$scn" in
    save) race save save pv "$DELAY" 0 ;;
    migrate) race migrate migrate pvh "$MIGRATE_DELAY" 0 ;;
    hooked) race hooked save pv "$HOOK_DELAY" 1 ;;
    destroy) destroy_scn destroy "$DELAY" ;;
    load) load_scn load ;;
    selftest) selftest_scn ;;
    features) features_scn features ;;
    teardown) teardown_scn teardown ;;
    perf) perf_scn perf ;;
    *) echo "XEN-SCN $scn error=unknown-scenario" ;;
    esac
done

# Files for the host's workdir.
for f in /run/xh/xs-*.txt /run/xh/watch-*.txt /run/xh/xl-*.txt /run/xh/blkshim.log /run/xh/xen-init-dom0.log /run/xh/selftest.txt /run/xh/load-leftover.txt; do
    [ -f "$f" ] && dumpfile "$(basename "$f")" "$f"
done
for f in /var/lib/blkshim/*; do [ -f "$f" ] && dumpfile "blkshim-state-$(basename "$f")" "$f" 20000; done
for f in /var/log/xen/*.log; do [ -f "$f" ] && dumpfile "var-log-xen-$(basename "$f")" "$f" 100000; done
[ -n "$BLKSHIM_PID" ] && { kill "$BLKSHIM_PID" 2>/dev/null; }
stop_relays
[ -n "$BLKSHIM_RELAY" ] && { sleep 1; killtree "$BLKSHIM_RELAY"; }
poweroff_now
