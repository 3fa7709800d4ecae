#!/bin/busybox sh
# /init of the Portless VM images: mount what the agent needs, load the virtio console modules
# (bench image only) and the VFIO ones (for interrupts on ivshmem-doorbell), and keep
# portless-agent running; in the bench image (`cargo xtask image --bench`) also qemu-ga.
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# cgroup v2: the agent runs each execution in a cgroup of its own (killed as a whole, limited
# as the allow-list says).
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console \
  irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci; do
  [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko" 2>/dev/null
done
hostname portless-guest
# Extra agent options from the kernel command line: agent_args=--wakeup,poll
args=$(sed -n 's/.*agent_args=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
# qemu-ga (bench image only) on the virtio-serial port named org.qemu.guest_agent.0. There is
# no udev: the port's device is /dev/<entry> for the /sys/class/virtio-ports entry with that
# name; it appears shortly after virtio_console loads (if QEMU has the port at all). The wait
# happens in the background, so both agents start at once.
if [ -x /usr/sbin/qemu-ga ]; then
  (
    port=
    i=0
    while [ -z "$port" ] && [ $i -lt 100 ]; do
      for f in /sys/class/virtio-ports/*/name; do
        [ -r "$f" ] && [ "$(cat "$f")" = org.qemu.guest_agent.0 ] || continue
        d=${f%/name}
        [ -c "/dev/${d##*/}" ] && port=/dev/${d##*/}
      done
      [ -n "$port" ] || sleep 0.05
      i=$((i + 1))
    done
    if [ -z "$port" ]; then
      echo "init: no virtio-serial port org.qemu.guest_agent.0; qemu-ga not started"
      exit 0
    fi
    mkdir -p /run/qemu-ga
    echo "init: starting qemu-ga on $port"
    while true; do
      /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run/qemu-ga -f /run/qemu-ga/qemu-ga.pid
      echo "init: qemu-ga exited ($?), restarting"
      sleep 1
    done
  ) &
fi
# agent_log=kmsg: the agent's lines go to the kernel log only, not also to the serial console
# (which costs every logged execution a few hundred microseconds of emulated UART under TCG).
agent_err=/dev/console
grep -q 'agent_log=kmsg' /proc/cmdline && agent_err=/dev/null
echo "init: starting portless-agent $args"
(
  while true; do
    /bin/portless-agent --kmsg $args 2>"$agent_err"
    echo "init: portless-agent exited ($?), restarting"
    sleep 1
  done
) &
# PID 1 must not exit; it reaps orphans.
while true; do sleep 3600; done
