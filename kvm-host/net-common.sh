# shellcheck shell=bash
# Shared by the networked scenarios (net, mysql), after lib.sh: L1 bridges
# two TAPs (br0: tap0 for the source VMM, tap1 for the destination's) and is
# the guest's client at 10.0.2.1; the guest is 10.0.2.15 with MAC $MAC.
MAC=02:00:0a:00:02:0f
GUEST_IP=10.0.2.15
modprobe tun 2>/dev/null
modprobe bridge 2>/dev/null
[ -c /dev/net/tun ] || { mkdir -p /dev/net; mknod /dev/net/tun c 10 200; }
# A run before this one in the same L1 leaves its bridge and TAPs.
for l in tap0 tap1 br0; do ip link del "$l" 2>/dev/null || true; done
ip link add br0 type bridge || fail "ip link add br0 type bridge"
ip addr add 10.0.2.1/24 dev br0 2>/dev/null
for t in tap0 tap1; do
  ip tuntap add "$t" mode tap || fail "ip tuntap add $t"
  ip link set "$t" master br0
  ip link set "$t" up
done
ip link set br0 up
# The bridge port the guest's MAC is learnt on (tap0, tap1 or nothing).
fdb_port() { bridge fdb show br br0 2>/dev/null | awk -v m="$MAC" '$1 == m { for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1) }' | head -n1; }
VMM_RUN_ARGS=(--net "tap=tap0,mac=$MAC")
VMM_RECV_ARGS=(--net tap=tap1)
