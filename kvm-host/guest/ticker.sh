# L2 guest (busybox sh): a timer-driven loop; one TICK line a second with the
# guest's uptime and the count of soft-lockup/RCU-stall and clocksource
# complaints in dmesg so far.
n=0
while true; do
  sleep 1
  n=$((n + 1))
  d=$(dmesg)
  l=$(echo "$d" | grep -c -e 'soft lockup' -e 'self-detected stall' -e 'detected stalls on CPUs')
  c=$(echo "$d" | grep -vi 'TSCs unsynchronized' | grep -ci -e 'clocksource.*unstable' -e 'clocksource.*watchdog' -e 'tsc.*unstable')
  echo "TICK n=$n uptime=$(cut -d' ' -f1 /proc/uptime) softlockups=$l clocksource=$c"
done
