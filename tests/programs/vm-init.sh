#!/bin/busybox sh
# /init of the test VM's initramfs (tests/vmguest.py builds it): mount the
# kernel filesystems, load the virtio-net driver, bring up eth0, run the
# test's /test.sh and power off. The host reads the serial console: lines
# starting "RESULT name=value" are results, "MARK name" are progress points.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/ TERM=dumb
mkdir -p /proc /sys /dev /tmp /www
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 1 > /proc/sys/kernel/printk
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || echo "RESULT insmod_failed=$m"
done
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
echo "MARK userspace"
if [ -f /test.sh ]; then
  sh /test.sh 2>&1
  echo "RESULT exit=$?"
fi
echo "MARK done"
sync
poweroff -f
