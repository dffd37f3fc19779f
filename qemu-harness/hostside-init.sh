#!/bin/busybox sh
# /init of the host-side fencing guest (busybox + the LIO modules in an
# initramfs, no root disk). The test itself comes in a second cpio archive
# hostside.sh appends: /payload/run.sh (hostside-guest.sh) and the binaries.
# Every line the host parses starts with "HOSTSIDE-"; everything goes to the
# serial console.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=256m tmp /tmp

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || echo "HOSTSIDE-WARN insmod $m failed"
done
echo "HOSTSIDE-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"

if [ -x /payload/run.sh ]; then
    /payload/run.sh
    echo "HOSTSIDE-GUEST-DONE rc=$?"
else
    echo "HOSTSIDE-RESULT payload FAIL no /payload/run.sh in the initramfs"
    echo "HOSTSIDE-GUEST-DONE rc=1"
fi
sync
poweroff -f
