# enlightened-twice: the memcached guest migrated A -> B enlightened, then
# B -> A' (a new vmm receive on another port) enlightened again: the second
# Prepare is answered by the same guest module after its first migration,
# both integrity checks match, the guest runs on and memcached keeps its
# values, no free page sent either time, frames released after each.
# timeout: 900
source /payload/kvm-host/lib.sh "$@"
source /payload/kvm-host/migrate-common.sh

disk=$(fresh_disk mig)
boot_loaded a "$disk"
migrate_and_check a b 7011 enlightened there || exit 1
check_enlightened_report there
b0=$(field "$MIG_BEFORE" memfree_kb)
wait_released b "$b0" 60
s=$(status b)
expect "there: frames released at B (holding=$(field "$s" holding), MemFree $(field "$s" memfree_kb) vs $b0 kB)" \
  eval '[ "$(field "$s" holding)" = 0 ] && within_pct "$(field "$s" memfree_kb)" "$b0" 1'
# Let the guest run a little at B before it goes back.
wait_tick b $(($(tick b) + 2)) 60
migrate_and_check b back 7012 enlightened back || exit 1
check_enlightened_report back
seq1=$(report_get there .enlightenment.seq)
seq2=$(report_get back .enlightenment.seq)
put prepare_seqs "[${seq1:-null}, ${seq2:-null}]"
expect "the second Prepare succeeded (Ready seq ${seq2:-none} after ${seq1:-none})" gt "${seq2:-0}" 0
b1=$(field "$MIG_BEFORE" memfree_kb)
wait_released back "$b1" 60
s=$(status back)
expect "back: frames released at A' (holding=$(field "$s" holding), MemFree $(field "$s" memfree_kb) vs $b1 kB)" \
  eval '[ "$(field "$s" holding)" = 0 ] && within_pct "$(field "$s" memfree_kb)" "$b1" 1'
stop_vm back
puts dest_exit "$VM_RC"
