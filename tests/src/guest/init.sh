#!/bin/busybox sh
# /init of the test guest (tests/src/guest): formats (first boot) or checks and mounts
# the ext4 disk /dev/vda, reports its files, writes more (sr.files=N, 0 = until power-off)
# with a sync after each, and powers off on the ACPI power button. Every report is a
# line "SR-..." on the serial console.
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "SR-$*"; }
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk button evdev; do
    insmod /lib/modules/$m.ko || say "INSMOD-FAILED $m"
done
files=0
for a in $(cat /proc/cmdline); do
    case $a in sr.files=*) files=${a#sr.files=} ;; esac
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || { say "NODISK"; poweroff -f; }
# The power button: the kernel's ACPI button driver reports it as an input event.
for e in /sys/class/input/event*; do
    if grep -q "Power Button" $e/device/name 2>/dev/null; then
        (head -c 1 /dev/input/${e##*/} >/dev/null && touch /tmp/down) &
        say "POWERBUTTON-WATCHED ${e##*/}"
    fi
done
magic=$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ "$magic" = "53ef" ]; then
    # Mounting replays the journal (after a crash); then a read-only full check.
    mount -t ext4 /dev/vda /mnt && umount /mnt || say "MOUNT-FAILED first"
    /usr/sbin/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1
    rc=$?
    [ $rc = 0 ] || sed 's/^/SR-FSCKLOG /' /tmp/fsck.log
    say "FSCK $rc"
else
    /usr/sbin/mke2fs -q -t ext4 -F /dev/vda || say "MKFS-FAILED"
    say "FORMATTED"
fi
mount -t ext4 /dev/vda /mnt || { say "MOUNT-FAILED"; poweroff -f; }
mkdir -p /mnt/data
boot=$(($(cat /mnt/boots 2>/dev/null || echo 0) + 1))
echo $boot >/mnt/boots
sync
say "BOOT $boot"
for f in /mnt/data/*; do
    [ -f "$f" ] || continue
    n=${f##*/}
    want=$(yes "file $n" | head -c 16384 | md5sum)
    got=$(md5sum <"$f")
    if [ "$want" = "$got" ]; then say "FILE $n ok"; else say "FILE $n bad"; fi
done
say "CHECKED"
i=0
while [ ! -e /tmp/down ]; do
    if [ "$files" = 0 ] || [ $i -lt $files ]; then
        i=$((i + 1))
        n=b$boot-$i
        yes "file $n" | head -c 16384 >/mnt/data/$n && sync && say "SYNCED $n"
        [ "$i" = "$files" ] && say "WROTE $i"
    else
        sleep 0.2
    fi
done
say "POWERBUTTON"
cd /
umount /mnt && say "UNMOUNTED" || say "UMOUNT-FAILED"
poweroff -f
