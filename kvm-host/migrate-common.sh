# shellcheck shell=bash
# Sourced by the migration scenarios after lib.sh: a Linux guest with
# memcached written to from inside it (guest/memcached.sh), migrated between
# two vmm processes on L1's loopback.

# boot_loaded NAME DISK: boots the memcached guest and waits until it has
# been written to and verified a few times.
boot_loaded() {
  local name=$1 disk=$2 t0
  t0=$(now)
  boot_vm "$name" "$disk" "$K/guest/memcached.sh" 180 || fail "no VMM-GUEST-READY from the guest within 180 s (see $name.serial, $name.stderr)"
  put boot_s "$(since "$t0")"
  wait_tick "$name" 3 300 || fail "the guest's memcached load did not reach tick 3 (last: $(status "$name"))"
  put load_ready_s "$(since "$t0")"
}

# wait_released NAME MEMFREE_BEFORE TIMEOUT: waits until the guest's status
# shows holding 0 and MemFree within 1% of MEMFREE_BEFORE.
wait_released() {
  local name=$1 before=$2 t=$3 i s
  for i in $(seq 1 $((t * 2))); do
    s=$(status "$name")
    if [ "$(field "$s" holding)" = 0 ] && within_pct "$(field "$s" memfree_kb)" "$before" 1; then
      return 0
    fi
    alive "$name" || return 1
    sleep 0.5
  done
  return 1
}

# check_enlightened_report REPORT_NAME: the report of an enlightened
# migration: no free page sent, and its classes come from the Linux module.
check_enlightened_report() {
  local rn=$1 c
  c=$(report_get "$rn" .enlightenment.classes)
  put "${rn}_classes" "${c:-null}"
  put "${rn}_free_pages" "$(report_get "$rn" .pages.free)"
  put "${rn}_guest_counts_match" "$(report_get "$rn" .enlightenment.guest_counts_match)"
  local fps kern pt user file free
  fps=$(report_get "$rn" .free_pages_sent)
  kern=$(jq -r '.kernel // 0' <<<"${c:-{\}}")
  pt=$(jq -r '.page_table // 0' <<<"${c:-{\}}")
  user=$(jq -r '(.user_code // 0) + (.user_data // 0)' <<<"${c:-{\}}")
  file=$(jq -r '(.file_active // 0) + (.file_inactive // 0)' <<<"${c:-{\}}")
  free=$(report_get "$rn" .pages.free)
  expect "$rn: no free page was sent (free_pages_sent=$fps)" eq "$fps" 0
  expect "$rn: the guest reported free pages (${free:-none})" gt "${free:-0}" 0
  expect "$rn: the class counts come from the Linux module (kernel=$kern page_table=$pt user_code+user_data=$user file_*=$file)" \
    eval 'gt "$kern" 0 && gt "$pt" 0 && gt "$user" 0 && gt "$file" 0'
}

# migrate_and_check SRC DST PORT MODE REPORT_NAME: migrates SRC (running the
# memcached guest) to a new `vmm receive` DST and checks the result: the
# migration succeeded with integrity match, the source VMM ended, the guest
# runs on at the destination and memcached answers with every value written.
# Figures are put with the prefix REPORT_NAME_; MIG_BEFORE is the source's
# last status line before the migration.
migrate_and_check() {
  local src=$1 dst=$2 port=$3 mode=$4 rn=$5 rc=0 t before after src_last
  start_receive "$dst" "$port"
  before=$(status "$src")
  MIG_BEFORE=$before
  put "${rn}_before" "$(status_json "$before")"
  t=$(now)
  migrate "$src" "$port" "$mode" "$rn" || rc=$?
  put "${rn}_migrate_s" "$(since "$t")"
  put_report_figures "${rn}_" "$rn"
  if [ $rc -ne 0 ]; then
    FAILS+=("$rn: vmm migrate --mode $mode failed (status $rc): $(migration_error "$rn")")
    if alive "$src"; then
      wait_tick "$src" $(($(tick "$src") + 1)) 60 >/dev/null && log "the guest still runs at the source"
    fi
    return 1
  fi
  expect "$rn: integrity match (every page at the destination = the source's at suspension)" is_true "$(report_get "$rn" .integrity.match)"
  wait_vm "$src" 60
  put "${rn}_source_exit" "\"$VM_RC\""
  expect "$rn: the source VMM ended after the migration (exit status $VM_RC)" eval '[ "$VM_RC" != timeout ]'
  src_last=$(tick "$src")
  t=$(now)
  if wait_tick "$dst" $((src_last + 2)) 180; then
    put "${rn}_dest_first_ticks_s" "$(since "$t")"
  fi
  after=$(status "$dst")
  put "${rn}_after" "$(status_json "$after")"
  expect "$rn: the guest runs on at the destination (tick $(field "$after" tick) > last at the source $src_last)" \
    gt "$(field "$after" tick)" "$src_last"
  check_memcached "$after" "$(field "$before" written)" "$rn at the destination"
  expect "$rn: no soft lockup or clocksource complaint in the guest (softlockups clocksource: $(guest_complaints "$dst"))" \
    eval '[ "$(guest_complaints "$dst")" = "0 0" ]'
  return 0
}
