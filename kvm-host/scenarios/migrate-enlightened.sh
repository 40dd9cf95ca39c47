# migrate-enlightened: a Linux guest with memcached being written to from inside it,
# migrated with vmm migrate --mode enlightened between two vmm processes on L1's
# loopback: integrity match, the guest runs on at the destination, every
# value written before the migration is still there.
# Also: no free page sent, class counts from the Linux module (kernel,
# page_table, user_*, file_*), and afterwards the guest's held frames are
# back (debugfs holding 0, MemFree within 1% of before).
# timeout: 600
source /payload/kvm-host/lib.sh "$@"
source /payload/kvm-host/migrate-common.sh

disk=$(fresh_disk mig)
boot_loaded src "$disk"
if migrate_and_check src dst 7004 enlightened m1; then
  check_enlightened_report m1
  before=$(field "$MIG_BEFORE" memfree_kb)
  t=$(now)
  wait_released dst "$before" 60
  put release_s "$(since "$t")"
  s=$(status dst)
  put memfree_before_kb "$before"
  put memfree_after_kb "$(field "$s" memfree_kb)"
  expect "the guest gave its held frames back at the destination (holding=$(field "$s" holding), MemFree $(field "$s" memfree_kb) kB vs $before kB before: within 1%)" \
    eval '[ "$(field "$s" holding)" = 0 ] && within_pct "$(field "$s" memfree_kb)" "$before" 1'
fi
stop_vm dst
puts dest_exit "$VM_RC"
