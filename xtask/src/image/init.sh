#!/bin/busybox sh
# /init of the Portless test image: mount what the agent needs, load the VFIO modules (for
# interrupts on ivshmem-doorbell), and keep portless-agent running.
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci; do
  [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko" 2>/dev/null
done
hostname portless-guest
# Extra agent options from the kernel command line: agent_args=--wakeup,poll
args=$(sed -n 's/.*agent_args=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
echo "init: starting portless-agent $args"
(
  while true; do
    /bin/portless-agent --kmsg $args
    echo "init: portless-agent exited ($?), restarting"
    sleep 1
  done
) &
# PID 1 must not exit; it reaps orphans.
while true; do sleep 3600; done
