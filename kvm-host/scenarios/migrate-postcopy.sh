# migrate-postcopy: a Linux guest with memcached being written to from inside it,
# migrated with vmm migrate --mode postcopy between two vmm processes on L1's
# loopback: integrity match, the guest runs on at the destination, every
# value written before the migration is still there.
# timeout: 600
source /payload/kvm-host/lib.sh "$@"
source /payload/kvm-host/migrate-common.sh

disk=$(fresh_disk mig)
boot_loaded src "$disk"
migrate_and_check src dst 7003 postcopy m1
stop_vm dst
puts dest_exit "$VM_RC"
