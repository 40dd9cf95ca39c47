# net: a Linux guest on virtio-net. L1 bridges two TAPs (br0: tap0 for the
# source VMM, tap1 for the destination's) and is the guest's client at
# 10.0.2.1: ping and memcached over TCP reach the guest (frames both ways
# through Linux's virtio_net driver), the guest is migrated with
# --enlightened while one TCP connection to its memcached stays open, the
# destination's announcement moves the guest's MAC to tap1 in the bridge's
# FDB before any client traffic, and the same connection then reads back the
# value it stored before the migration. Meanwhile memslap (memcaslap,
# set:get 1:9) loads the guest's memcached from L1 through the whole
# migration: it must exit cleanly with no connection error and be served
# in every second after the switch-over.
# timeout: 600
source /payload/kvm-host/lib.sh "$@"
source /payload/kvm-host/migrate-common.sh

source /payload/kvm-host/net-common.sh

disk=$(fresh_disk net)
t0=$(now)
boot_vm src "$disk" "$K/guest/net.sh" 180 || fail "no VMM-GUEST-READY from the guest within 180 s (see src.serial, src.stderr)"
put boot_s "$(since "$t0")"
wait_tick src 3 300 || fail "the guest's memcached load did not reach tick 3 (last: $(status src))"
gnet=$(grep -a '^GUEST-NET ' "$OUT/src.serial" | tail -n1 | tr -d '\r')
puts guest_net "$gnet"
expect "the guest's eth0 is virtio_net with the MAC vmm gave it ($gnet)" eval '[[ "$gnet" == *"mac=$MAC driver=virtio_net"* ]]'

# Frames both ways: ICMP, then TCP.
t=$(now)
ping_out=$(busybox ping -c 5 -W 5 "$GUEST_IP" 2>&1)
put ping_s "$(since "$t")"
puts ping "$(tail -n 2 <<<"$ping_out" | tr '\n' ' ')"
expect "the guest answers ping on virtio-net ($(grep -o '[0-9]* packets received' <<<"$ping_out"))" grep -q ' 0% packet loss' <<<"$ping_out"
exec 3<>"/dev/tcp/$GUEST_IP/11211" || fail "no TCP connection to the guest's memcached"
mc() { printf '%s\r\n' "$@" >&3; }
mc_read() { local l; IFS= read -r -t 30 l <&3 && printf '%s' "${l%$'\r'}"; }
mc "set netkey 0 0 16" "before-migration"
r=$(mc_read)
expect "memcached over TCP from L1 stores a value ($r)" eval '[ "$r" = STORED ]'
port_before=$(fdb_port)
puts fdb_before "$port_before"
expect "the bridge has learnt the guest's MAC on tap0 (${port_before:-none})" eval '[ "$port_before" = tap0 ]'

# memslap through the migration; a small key window (-w 1k: 4k keys of
# 256 bytes) keeps memcached's LRU from evicting the load's own keys.
# One connection (-c 1, one request in flight: ~700 a second under
# TCG; memslap's --tps takes thousands only): with 4 (~1000/s, two
# interrupts each) the L2 guest triple-faulted within seconds about one run
# in two *before any migration* (seen with stop-and-copy, at the source),
# and L1 itself panicked in KVM_RUN (bad GS in exc_page_fault): the nested
# SVM emulation, not vmm (kvm-host/README.md, "Guests that die under network load").
printf 'key\n16 16 1\nvalue\n256 256 1\ncmd\n0 0.1\n1 0.9\n' >"$OUT/memslap.cfg"
{
  stdbuf -oL memcaslap -s "$GUEST_IP:11211" -F "$OUT/memslap.cfg" -T 1 -c 1 -w 1k -t 30s -S 1s
  echo "MEMSLAP-EXIT $?"
} 2>&1 | while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done >"$OUT/memslap.out" &
memslap_pid=$!
sleep 4

# Migrate with the connection open.
if migrate_and_check src dst 7010 enlightened m1; then
  check_enlightened_report m1
fi
migrated_at=$(date +%s.%N)
port_after=$(fdb_port)
puts fdb_after "$port_after"
expect "the destination's announcement moved the guest's MAC to tap1 before any client traffic (${port_after:-none})" \
  eval '[ "$port_after" = tap1 ]'
t=$(now)
mc "get netkey"
l1=$(mc_read)
l2=$(mc_read)
l3=$(mc_read)
put get_after_s "$(since "$t")"
puts get_after "$l1 | $l2 | $l3"
expect "the TCP connection opened before the migration reads the value back from the destination ($l1 | $l2 | $l3)" \
  eval '[ "$l1" = "VALUE netkey 0 16" ] && [ "$l2" = before-migration ] && [ "$l3" = END ]'
exec 3>&-
wait "$memslap_pid"
# Per second (memslap's own Total Statistics period rows): served after the switch-over?
ms_after=$(awk -v t="$migrated_at" '/Total Statistics/ && !/events/ { tot = 1; next }
  tot && $2 == "Period" { tot = 0; if ($1 > t) { n++; if ($5 > 0) ok++ } }
  END { printf "%d/%d", ok, n }' "$OUT/memslap.out")
ms_errors=$(grep -ciE 'error|fail|refused|reset|closed|timeout' "$OUT/memslap.out" || true)
ms_summary=$(grep -a 'Run time:' "$OUT/memslap.out" | cut -d' ' -f2- | tail -n1)
puts memslap "$ms_summary"
puts memslap_periods_after "$ms_after"
expect "memslap ran through the migration and exited cleanly ($(grep -a MEMSLAP-EXIT "$OUT/memslap.out" | cut -d' ' -f2-))" \
  grep -q 'MEMSLAP-EXIT 0$' "$OUT/memslap.out"
expect "memslap saw no connection error ($ms_errors lines; $ms_summary)" eval '[ "$ms_errors" = 0 ]'
expect "memslap was served in every second after the switch-over ($ms_after periods)" \
  eval '[ "${ms_after%/*}" = "${ms_after#*/}" ] && [ "${ms_after#*/}" -gt 0 ]'
ping_out=$(busybox ping -c 3 -W 5 "$GUEST_IP" 2>&1)
expect "the guest answers ping at the destination" grep -q ' 0% packet loss' <<<"$ping_out"
net=$(api dst status 2>/dev/null | jq -c '.net // empty')
put dest_net "${net:-null}"
expect "the destination's device counted the traffic and announced ($net)" \
  eval '[ "$(jq -r ".[0].rx_frames > 0 and .[0].tx_frames > 0 and .[0].tap == \"tap1\"" <<<"${net:-[{\}]}")" = true ]'
stop_vm dst
puts dest_exit "$VM_RC"
