# boot: the project's Linux 6.12 guest boots in vmm with 2 vCPUs, its ext4
# root on virtio-blk (virtio-mmio), the enlighten module loaded and bound to
# vmm's enlightenment device; the guest reboots at the end (reboot=k: i8042)
# and vmm exits 0.
# timeout: 300
source /payload/kvm-host/lib.sh "$@"

disk=$(fresh_disk boot)
t0=$(now)
boot_vm vm "$disk" "$K/guest/boot.sh" 180 || fail "no VMM-GUEST-READY from the guest within 180 s (see vm.serial, vm.stderr)"
put boot_s "$(since "$t0")"
wait_serial vm 'VMM-GUEST-EXIT' 120 || fail "the guest script did not finish (no VMM-GUEST-EXIT)"
wait_vm vm 60
put vmm_exit "\"$VM_RC\""
put total_s "$(since "$t0")"
[ "$VM_RC" = timeout ] && { stop_vm vm; }

s=$OUT/vm.serial
fact() { grep -a "^FACT $1=" "$s" | tail -n1 | sed "s/^FACT $1=//" | tr -d '\r'; }
ready=$(grep -a 'VMM-GUEST-READY' "$s" | tail -n1 | tr -d '\r')
puts ready "$ready"
puts kernel "$(sed -n 's/.*kernel=\([^ ]*\).*/\1/p' <<<"$ready")"
for k in nproc cpus_online root vda_driver vda_path module debugfs bound bound_msg virtio holding clock irqs uptime tsc_unsynchronized_at_boot complaints; do
  puts "guest_$k" "$(fact "$k")"
done
put guest_uptime_s "$(fact uptime)"

expect "the guest's init loaded the module (VMM-GUEST-READY module=loaded)" grep -q 'module=loaded' <<<"$ready"
expect "2 vCPUs online (nproc=$(fact nproc), online=$(fact cpus_online))" eval '[ "$(fact nproc)" = 2 ] && [ "$(fact cpus_online)" = 0-1 ]'
expect "root is ext4 on /dev/vda ($(fact root))" eval '[[ "$(fact root)" == *:ext4 ]]'
expect "vda is driven by virtio_blk over virtio-mmio ($(fact vda_driver), $(fact vda_path))" \
  eval '[ "$(fact vda_driver)" = virtio_blk ] && [[ "$(fact vda_path)" == *virtio-mmio* || "$(fact vda_path)" == *virtio_mmio* || "$(fact vda_path)" == */platform/* ]]'
expect "the module's debugfs directory exists (/sys/kernel/debug/enlighten: $(fact debugfs) files)" gt "$(fact debugfs)" 0
virtio_ids=$(fact virtio)
if [[ ",$virtio_ids" == *",0x003f,"* ]]; then
  expect "the enlighten module is bound to vmm's enlightenment device (virtio ID 63; sysfs bound=$(fact bound), dmesg 'device bound' x$(fact bound_msg))" \
    eval '[ "$(fact bound)" -ge 1 ] && [ "$(fact bound_msg)" -ge 1 ]'
else
  expect "vmm offers the Linux guest an enlightenment device (virtio ID 63; the guest sees virtio devices [${virtio_ids%,}]: none is 0x003f, so the module loaded but did not bind: vmm creates the device for testbed guests only)" false
fi
bad_lines=$(grep -avi 'TSCs unsynchronized' "$s" | grep -aiE 'soft lockup|self-detected stall|stalls on CPUs|clocksource.*unstable|BUG:|WARNING:|Oops' | head -n 3 | tr -d '\r' | tr '\n' '|')
expect "no oops, BUG, WARNING, soft lockup, RCU stall or unstable clocksource in dmesg ($(fact complaints) lines${bad_lines:+: $bad_lines})" eq "$(fact complaints)" 0
expect "vmm exited 0 after the guest rebooted (exit status $VM_RC)" eq "$VM_RC" 0
