# L2 guest (busybox sh, run by guest-image/init from vmm.run=): memcached
# with 16 MiB of values, then written to and verified from inside the guest
# forever, one MC-STATUS line every 2 s (enlcheck mc-load, guest-image/enlcheck.rs).
echo "GUEST nproc=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
memcached -u root -m 64 -p 11211 -l 127.0.0.1 -d || echo "GUEST memcached failed to start"
i=0
while ! enlcheck mc-verify 11211 0 0 >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
enlcheck fill 11211 16
exec enlcheck mc-load 11211 50 2000
