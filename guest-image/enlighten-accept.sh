#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
# Guest side of guest-module/tests/qemu-enlighten.py (in the root file system
# as /usr/share/vmm/enlighten-accept.sh). Reacts to the module's debugfs
# counters as the host drives Prepare/Done/Abort, checks with enlcheck, and
# prints STEP/T-OK/T-FAIL/STAT lines for the host.
#   enlighten-accept.sh MC_MIB IDLE_S HOG_MIB HOG_S RELOADS
MC_MIB=${1:-48} IDLE_S=${2:-5} HOG_MIB=${3:-256} HOG_S=${4:-12} RELOADS=${5:-10}
set -u
D=/sys/kernel/debug/enlighten
cnt() { cat $D/$1; }
waitc() { while [ "$(cnt $1)" -lt "$2" ]; do sleep 0.05; done; }
# MemFree after dropping the reclaimable caches (the test's own shell loops
# grow the dentry/inode caches), so that only lasting use is compared.
memfree() { sync; echo 3 >/proc/sys/vm/drop_caches; awk '/^MemFree/ { print $2 }' /proc/meminfo; }
within1() { awk -v a="$1" -v b="$2" -v w="$3" 'BEGIN { d = a - b; if (d < 0) d = -d;
  if (d * 100 <= a) { printf "T-OK: MemFree %s: %d kB vs %d kB before (%.3f%%)\n", w, b, a, d * 100 / a }
  else { printf "T-FAIL: MemFree %s: %d kB vs %d kB before (%.3f%%)\n", w, b, a, d * 100 / a } }'; }
memcached -u memcache -p 11211 -l 127.0.0.1 -m 128 -d -P /tmp/mc.pid || echo "T-FAIL: memcached"
sleep 1
enlcheck fill 11211 $MC_MIB || echo "T-FAIL: fill"
sleep 100000 &
idle=$!
mc=$(cat /tmp/mc.pid)
sleep $IDLE_S
m0=$(memfree)
echo "MEMFREE before=$m0"
echo "STEP ready-for-prepare"
waitc readies 1
for f in sweep_us classify_us prepare_us held_pages frames active_processes idle_processes map_extents \
  class_kernel class_kernel_allocated class_memory_io class_page_table class_user_code class_user_data \
  class_file_active class_file_inactive class_other class_free; do echo "STAT $f=$(cnt $f)"; done
md5sum $D/free_bitmap $D/priority_map | sed 's/^/MD5 /'
enlcheck check $mc $idle || echo "T-FAIL: enlcheck check"
echo "STEP checked"
waitc dones 1
m1=$(memfree); echo "MEMFREE after_done=$m1"; within1 $m0 $m1 "after Done"
echo "HELD after_done=$(cnt held_pages)"
echo "STEP after-done"
waitc aborts 1
m2=$(memfree); echo "MEMFREE after_abort=$m2"; within1 $m0 $m2 "after Abort"
echo "STEP after-abort"
waitc rejected 6
waitc aborts 2
v=$(printf 'get key1\r\nquit\r\n' | nc 127.0.0.1 11211 | head -1 | tr -d '\r')
case $v in "VALUE key1 0 1000") echo "T-OK: memcached answers after malformed commands" ;; *) echo "T-FAIL: memcached after malformed: $v" ;; esac
echo "STEP malformed-done"
waitc dones 101
m3=$(memfree); echo "MEMFREE after_cycles=$m3"; within1 $m0 $m3 "after 100 Prepare/Done cycles"
[ "$(cnt held_pages)" = 0 ] && echo "T-OK: nothing held after the cycles" || echo "T-FAIL: pages still held"
echo "STEP cycles-done"
enlcheck hog $HOG_MIB $HOG_S > /tmp/hog.out 2>&1 &
hog=$!
# The hog reaches the module's shrinker only when its allocations land in
# the few ms a sweep lasts (one CI run saw none in 94 Prepares), so for the
# first half of the hog a reclaim loop also calls every shrinker
# (drop_caches 2): the back-off path runs in every such run.
(
  read -r up _ </proc/uptime
  stop=$((${up%.*} + HOG_S / 2))
  while read -r up _ </proc/uptime && [ "${up%.*}" -lt $stop ]; do
    echo 2 >/proc/sys/vm/drop_caches
  done
) &
sleep 1
echo "STEP hog-running"
wait $hog; hs=$?
cat /tmp/hog.out
echo "STAT hog_backoffs=$(cnt backoffs) hog_pressure_released=$(cnt pressure_released) errors=$(cnt errors)"
[ $hs = 0 ] && echo "T-OK: hog finished" || echo "T-FAIL: hog exit status $hs"
if dmesg | grep -qiE 'out of memory|oom-kill|invoked oom'; then echo "T-FAIL: OOM during the hog"; dmesg | grep -iE 'oom|out of memory'; else echo "T-OK: no OOM with a hog during Prepare"; fi
echo "STEP hog-done"
sleep 2
m4=$(memfree); echo "MEMFREE before_reload=$m4"
i=0
while [ $i -lt $RELOADS ]; do
  rmmod enlighten || echo "T-FAIL: rmmod $i"
  insmod /lib/modules/enlighten.ko || echo "T-FAIL: insmod $i"
  echo "STEP loaded $i"
  waitc readies 1
  i=$((i + 1))
done
rmmod enlighten || echo "T-FAIL: last rmmod"
insmod /lib/modules/enlighten.ko || echo "T-FAIL: last insmod"
sleep 1
m5=$(memfree); echo "MEMFREE after_reloads=$m5"; within1 $m0 $m5 "after $RELOADS load/Prepare/unload cycles"
echo "STEP reloads-done"
# Steady-state cost: the module adds nothing to the allocator's paths.
# Alternating runs (TCG timing drifts); the host takes the best of each.
for r in 1 2; do
  rmmod enlighten
  enlcheck mallocbench 1000000 | sed 's/^mallocbench:/MALLOC unloaded:/'
  insmod /lib/modules/enlighten.ko
  enlcheck mallocbench 1000000 | sed 's/^mallocbench:/MALLOC loaded:/'
done
if dmesg | grep -nE 'Oops|BUG:|WARNING:|Kernel panic|Call Trace|leak'; then echo "T-FAIL: kernel complained"; else echo "T-OK: no kernel complaints"; fi
echo "STEP end"
