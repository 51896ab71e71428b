#!/bin/sh
# /init of the xreplay lab's domU: report the event-channel ABI on the console, then keep
# event channels busy (timer plus a console write every 2 s) and idle in a shell on hvc0.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "XREPLAY-DOMU-BANNER kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)" \
  "uptime=$(cut -d' ' -f1 /proc/uptime)"
dmesg | grep -E 'xen:events|Booting paravirtualized|Xen version'
( i=0; while :; do i=$((i+1)); echo "domu tick $i"; sleep 2; done ) &
# lab up --domu-busy: a 4 ms sleep loop, so a timer VIRQ upcall comes every few ms (the
# event rate a stub benchmark needs) and the vCPU still blocks between them. (A pure spin
# loop soft-locked this domU under TCG.)
grep -q xreplay.busy=1 /proc/cmdline && { echo "XREPLAY-DOMU-BUSY"; ( while :; do usleep 4000; done ) & }
exec setsid cttyhack sh
