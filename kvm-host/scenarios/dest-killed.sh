# dest-killed: an enlightened migration whose destination dies before the
# switch-over. The destination is stopped (SIGSTOP) as soon as it has
# accepted both connections, so the source goes through the guest's Prepare,
# pauses and sends the state, then waits for the confirmation; the
# destination is then killed (SIGKILL). The migrate command must fail, the
# guest run on at the source (ticks advance, memcached keeps its values) and
# its held frames be released (debugfs holding 0, MemFree within 1% of before).
# timeout: 600
source /payload/kvm-host/lib.sh "$@"
source /payload/kvm-host/migrate-common.sh
MODE=${MODE:-enlightened}
PORT=7021

disk=$(fresh_disk mig)
boot_loaded src "$disk"
start_receive dst $PORT
before=$(status src)
put before "$(status_json "$before")"

t0=$(now)
timeout 600 "$VMM" migrate --api-sock "$WORK/src.sock" --to "127.0.0.1:$PORT" --mode "$MODE" --key-file "$WORK/key" \
  --report "$OUT/m1.json" >"$OUT/m1.stdout" 2>"$OUT/m1.stderr" &
mpid=$!
# Stop the destination once it has both connections (post-copy modes log it).
stopped=0
for i in $(seq 1 3000); do
  if grep -aq 'registered with userfaultfd' "$OUT/dst.stderr" 2>/dev/null; then
    kill -STOP "${VM_PID[dst]}" && stopped=1
    break
  fi
  kill -0 $mpid 2>/dev/null || break
  sleep 0.02
done
put dest_stopped_s "$(since "$t0")"
phase=""
if [ $stopped = 1 ]; then
  # Wait for the source to be past its Prepare, waiting for the confirmation.
  for i in $(seq 1 100); do
    phase=$(api src status 2>/dev/null | jq -r '.migration.phase // empty' 2>/dev/null)
    [ "$phase" = switch-over ] && break
    kill -0 $mpid 2>/dev/null || break
    sleep 0.2
  done
fi
puts source_phase_at_kill "${phase:-?}"
log "destination stopped=$stopped; source phase '$phase'; killing the destination"
kill -KILL "${VM_PID[dst]}" 2>/dev/null
wait_vm dst 10
# The migrate ends at once if the destination died before the switch-over;
# after it (a failed stop) the source would wait for it to come back.
for i in $(seq 1 300); do
  kill -0 $mpid 2>/dev/null || break
  sleep 0.2
done
if kill -0 $mpid 2>/dev/null; then
  FAILS+=("vmm migrate still runs 60 s after the destination was killed (source phase: $(api src status 2>/dev/null | jq -r '.migration.phase // empty'))")
  kill -KILL $mpid 2>/dev/null
fi
rc=0
wait $mpid || rc=$?
put migrate_s "$(since "$t0")"
put migrate_exit "$rc"
puts migrate_error "$(migration_error m1)"
expect "the destination was stopped before the switch-over (it had not confirmed: source phase '$phase')" \
  eval '[ $stopped = 1 ] && [ "$phase" = switch-over ]'
expect "vmm migrate failed (status $rc: $(migration_error m1))" eval '[ $rc -ne 0 ]'
expect "the source VMM still runs" alive src
st=$(api src status 2>/dev/null)
puts source_state "$(jq -r '.state // empty' <<<"$st" 2>/dev/null)"
expect "the source VM is running (state: $(jq -r '.state // empty' <<<"$st" 2>/dev/null))" eval '[ "$(jq -r ".state // empty" <<<"$st" 2>/dev/null)" = running ]'
last=$(tick src)
wait_tick src $((last + 3)) 120
after=$(status src)
put after "$(status_json "$after")"
expect "the guest runs on at the source (tick $(field "$after" tick) > $last)" gt "$(field "$after" tick)" "$last"
check_memcached "$after" "$(field "$before" written)" "at the source"
m0=$(field "$before" memfree_kb)
t=$(now)
wait_released src "$m0" 60
put release_s "$(since "$t")"
s=$(status src)
put memfree_before_kb "$m0"
put memfree_after_kb "$(field "$s" memfree_kb)"
expect "the guest's held frames were released (holding=$(field "$s" holding), MemFree $(field "$s" memfree_kb) vs $m0 kB before: within 1%)" \
  eval '[ "$(field "$s" holding)" = 0 ] && within_pct "$(field "$s" memfree_kb)" "$m0" 1'
stop_vm src
puts source_exit "$VM_RC"
