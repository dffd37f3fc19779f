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
        sleep 0.5; n=$((n + 1))
    done
    return 1
}
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
disk_line() { # target
    if [ "$BACKEND" = blkback ]; then
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
vcpus = 1
kernel = "/root/domU/vmlinuz"
ramdisk = "/root/domU/$4"
extra = "console=hvc0 rdinit=/init $5"
disk = [ $(disk_line "$6") ]
on_crash = "preserve"
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
    start_blkshim
    mkdisk "$scn" "$d" || { echo "XEN-SCN $scn error=storage"; return; }
    mkcfg /root/$scn.cfg "$name" "$type" probe.cpio.gz "xp.mode=probe xp.settle=$settle" "$SRC_TARGET"
    mkcfg /root/$scn-fast.cfg "$name" "$type" probe.cpio.gz "xp.mode=probe xp.settle=$settle" "$DST_TARGET"
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name--incoming.log
    xlrun "$scn" create 120 create /root/$scn.cfg || { echo "XEN-SCN $scn error=create"; cleanup_domains; rmdisk "$scn"; return; }
    local src; src=$($XL domid "$name")
    if ! waitlog 180 'gen 1 submitted' $(guest_logs "$name"); then
        echo "XEN-SCN $scn error=probe-not-started"; stop_relays; cleanup_domains; rmdisk "$scn"; return
    fi
    local t_gen1; t_gen1=$(up)
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
    # Wait for the delayed writes to have landed, then read the storage.
    local tend; tend=$(awk "BEGIN{print $t_gen1 + $d + $MARGIN}")
    while [ "$(awk "BEGIN{print ($(up) < $tend)}")" = 1 ]; do sleep 1; done
    xs_snap "$scn" "delay expired"
    local gens="" b=0 g
    while [ $b -lt 8 ]; do
        g=$(gen_of "$IMG" $b); gens="$gens${gens:+,}$g"
        echo "XEN-DOM0READ $scn block $b gen $g"
        b=$((b + 1))
    done
    waitlog $((settle + 60)) 'PROBE-RESULT' $(guest_logs "$name") || log "WARN $scn: no PROBE-RESULT"
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
    echo "XEN-SCN $scn backend=$BACKEND op=$op type=$type delay=$d after=$after hook=$hook armed=$armed suspend=$(echo "${susp:-none}" | tr ' ' '_' | head -c 80) probe=${res:-none} completed=${completed:-0} dom0_gens=$gens stale_blocks=$stale src=$src dst=${dst:-none} create_s=$T_create save_s=$T_save restore_s=$T_restore migrate_s=$T_migrate rc_op=${RC_save:-}${RC_migrate:-}/${RC_restore:-} elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}") record=${rec:-none}"
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

# ---- load: fio verify under save/restores and local migrations --------------
load_scn() { # scn
    local scn=$1 name=d-$1 t_start; t_start=$(up)
    log "=== scenario $scn: fio verify under $LOAD_OPS save/restores (and local migrations if LOAD_TYPE=pvh)"
    start_blkshim
    mkdisk "$scn" 0 || { echo "XEN-SCN $scn error=storage"; return; }
    point_fast "$scn"
    local tgt=/run/disks/$scn; [ "$DISK_NAMING" = symlink ] || tgt=$FAST
    local mem=$DOMU_MEM; DOMU_MEM=${LOAD_MEM:-256}
    # PVH would allow the local migrations too, but fio in a PVH domU
    # triple-faults under TCG here (the probe does not); PV can only be
    # saved/restored (no shadow paging for PV live migration in Debian's Xen).
    local type=${LOAD_TYPE:-pv}
    mkcfg /root/$scn.cfg "$name" "$type" fio.cpio.gz "rootfstype=ramfs xp.mode=fio xp.iodepth=8" "$tgt"
    DOMU_MEM=$mem
    rm -f $(guest_logs "$name")
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name.log
    relay "XEN-DOMU $scn" /var/log/xen/console/guest-$name--incoming.log
    xlrun "$scn" create 120 create /root/$scn.cfg || { echo "XEN-SCN $scn error=create"; cleanup_domains; rmdisk "$scn"; return; }
    waitlog 300 'DOMU-FIO-ROUND 1 start' $(guest_logs "$name") || { echo "XEN-SCN $scn error=fio-not-started"; stop_relays; cleanup_domains; rmdisk "$scn"; return; }
    watch_start "$scn"
    local i=1 ops="" fails=0
    while [ $i -le "$LOAD_OPS" ]; do
        sleep 5
        if xlrun "$scn" save 180 save "$name" "/run/xh/$scn.chk"; then
            xlrun "$scn" restore 180 restore "/run/xh/$scn.chk" || fails=$((fails + 1))
        else
            fails=$((fails + 1))
        fi
        rm -f "/run/xh/$scn.chk"
        ops="$ops save+restore:${T_save}+${T_restore}s"
        if [ "$type" = pvh ]; then
            sleep 5
            xlrun "$scn" migrate 300 migrate -s '' "$name" 'xl -vvv migrate-receive' || fails=$((fails + 1))
            ops="$ops migrate:${T_migrate}s"
        fi
        i=$((i + 1))
    done
    local id; id=$($XL domid "$name" 2>/dev/null)
    xenstore-write "/local/domain/$id/data/xh-stop" 1 || log "WARN $scn: cannot write data/xh-stop for domid $id"
    log "$scn: ops done ($ops; $fails failed); told domid $id to stop"
    waitlog "${LOAD_FINISH_TIMEOUT:-400}" 'DOMU-FIO-FINAL' $(guest_logs "$name") || log "WARN $scn: no DOMU-FIO-FINAL"
    watch_stop
    local fin; fin=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep 'DOMU-FIO-FINAL' | tail -1 | sed 's/.*DOMU-FIO-FINAL //; s/ /,/g')
    local rerr; rerr=$(cat $(guest_logs "$name") 2>/dev/null | tr -d '\r' | grep 'DOMU-FIO-ROUND .* end' | grep -o 'verify_errors=[0-9]*' | awk -F= '{s+=$2} END{print s+0}')
    local boots; boots=$(cat $(guest_logs "$name") 2>/dev/null | grep -c 'DOMU-BOOTED') # a reboot boots again
    [ "${boots:-0}" -gt 1 ] && fails=$((fails + 1)) && log "WARN $scn: the domU booted $boots times (crashed/rebooted)"
    echo "XEN-SCN $scn backend=$BACKEND op=load type=$type domu_boots=${boots:-0} ops_failed=$fails ops=$(echo $ops | tr ' ' ',') final=${fin:-none} round_verify_errors_total=$rerr elapsed_s=$(awk "BEGIN{printf \"%.0f\", $(up) - $t_start}")"
    cleanup_domains
    stop_relays
    rmdisk "$scn"
}

for scn in $SCENARIOS; do
    case "$scn" in
    save) race save save pv "$DELAY" 0 ;;
    migrate) race migrate migrate pvh "$MIGRATE_DELAY" 0 ;;
    hooked) race hooked save pv "$HOOK_DELAY" 1 ;;
    destroy) destroy_scn destroy "$DELAY" ;;
    load) load_scn load ;;
    *) echo "XEN-SCN $scn error=unknown-scenario" ;;
    esac
done

# Files for the host's workdir.
for f in /run/xh/xs-*.txt /run/xh/watch-*.txt /run/xh/xl-*.txt /run/xh/blkshim.log /run/xh/xen-init-dom0.log; do
    [ -f "$f" ] && dumpfile "$(basename "$f")" "$f"
done
for f in /var/lib/blkshim/*; do [ -f "$f" ] && dumpfile "blkshim-state-$(basename "$f")" "$f" 20000; done
for f in /var/log/xen/*.log; do [ -f "$f" ] && dumpfile "var-log-xen-$(basename "$f")" "$f" 100000; done
[ -n "$BLKSHIM_PID" ] && { kill "$BLKSHIM_PID" 2>/dev/null; }
stop_relays
[ -n "$BLKSHIM_RELAY" ] && { sleep 1; killtree "$BLKSHIM_RELAY"; }
poweroff_now
