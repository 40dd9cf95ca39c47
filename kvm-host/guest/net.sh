# L2 guest (busybox sh): eth0 (virtio-net) at 10.0.2.15/24, memcached on every
# address, then the same load as memcached.sh (written to and verified from
# inside the guest, one MC-STATUS line every 2 s).
echo "GUEST nproc=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || echo "GUEST eth0 failed"
echo "GUEST-NET eth0 mac=$(cat /sys/class/net/eth0/address) driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)")"
memcached -u root -m 64 -p 11211 -l 0.0.0.0 -d || echo "GUEST memcached failed to start"
i=0
while ! enlcheck mc-verify 11211 0 0 >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
enlcheck fill 11211 16
exec enlcheck mc-load 11211 50 2000
