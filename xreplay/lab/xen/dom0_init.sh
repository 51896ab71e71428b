#!/bin/sh
# /init of the xreplay lab's dom0 (busybox-static initramfs, PV dom0 under Xen 4.17).
# Starts the minimal Xen toolstack (xenstored, xen-init-dom0, xenconsoled), a command
# server for the host (nc on 7000, reached through QEMU user-net hostfwd), then creates the
# domU chosen by the kernel argument xreplay.domu=pv|pvh|none, with xreplay.domu_vcpus=N
# vCPUs (an `xl create` key=value override of the config's vcpus) and, with
# xreplay.domu_evtchn=fifo, Linux's default FIFO event channels (/domu/<kind>-fifo.cfg,
# no xen.fifo_events=0). Progress lines start with
# XREPLAY- and go to hvc0, i.e. Xen's serial console, where the host watches for them.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /run/xen /run/xenstored /var/run/xen /var/run/xenstored /var/log/xen
echo "XREPLAY-DOM0-INIT kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/load.order
mount -t xenfs xenfs /proc/xen
xenstored --pid-file /run/xenstored.pid || echo "XREPLAY-ERROR xenstored failed"
sleep 1
xen-init-dom0 >/dev/null || echo "XREPLAY-ERROR xen-init-dom0 failed"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen \
  || echo "XREPLAY-ERROR xenconsoled failed"
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
nc -ll -p 7000 -e /bin/xreplay-cmd &
echo "XREPLAY-DOM0-READY uptime=$(cut -d' ' -f1 /proc/uptime)"

DOMU=pv
VCPUS=1
CFG=
BUSY=
for a in $(cat /proc/cmdline); do
  case $a in
    xreplay.domu=*) DOMU=${a#xreplay.domu=};;
    xreplay.domu_evtchn=fifo) CFG=-fifo;;
    xreplay.domu_vcpus=*) VCPUS=${a#xreplay.domu_vcpus=};;
    xreplay.domu_busy=1) BUSY=1;;
  esac
done
if [ "$DOMU" != none ]; then
  set -- "vcpus=$VCPUS"
  if [ -n "$BUSY" ]; then  # xreplay.domu_busy=1: the cfg's extra= plus xreplay.busy=1
    set -- "$@" "extra=\"$(sed -n 's/^extra = "\(.*\)"$/\1/p' "/domu/$DOMU$CFG.cfg") xreplay.busy=1\""
  fi
  out=$(xl create "/domu/$DOMU$CFG.cfg" "$@" 2>&1); rc=$?
  echo "$out"
  domid=$(xl domid domu 2>/dev/null)
  if [ $rc -ne 0 ] || [ -z "$domid" ]; then
    echo "XREPLAY-DOMU-FAILED xl create rc=$rc"
  else
    i=0
    while [ $i -lt 300 ]; do
      grep -a -q XREPLAY-DOMU-BANNER /var/log/xen/guest-domu.log 2>/dev/null && break
      i=$((i+1)); sleep 1
    done
    if [ $i -lt 300 ]; then
      # xl list's VCPUs column: the vCPUs the guest brought online (the host checks it)
      online=$(xl list domu 2>/dev/null | awk 'NR==2 {print $4}')
      echo "XREPLAY-DOMU-UP domid=$domid type=$DOMU vcpus=$online" \
        "uptime=$(cut -d' ' -f1 /proc/uptime)"
    else
      echo "XREPLAY-DOMU-FAILED domid=$domid no banner in /var/log/xen/guest-domu.log"
    fi
  fi
fi
# a shell on hvc0 (Xen routes serial input to dom0), respawned; PID 1 reaps orphans
( while :; do setsid cttyhack sh; sleep 1; done ) &
while :; do wait; sleep 5; done
