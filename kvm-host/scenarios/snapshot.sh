# snapshot: a guest running a timer-driven loop (one TICK line a second) is
# snapshotted (vmm snapshot), its VMM shut down, and after a pause restored
# (vmm restore) from the file: the loop goes on, and dmesg has no soft lockup,
# RCU stall or clocksource complaint.
# timeout: 420
source /payload/kvm-host/lib.sh "$@"
GAP_S=${GAP_S:-25} # time between the snapshot and the restore (> the 20 s soft-lockup threshold)

ticks() { grep -a '^TICK ' "$OUT/$1.serial" 2>/dev/null | tr -d '\r'; }
last_n() { ticks "$1" | tail -n1 | sed -n 's/.* n=\([0-9]*\).*/\1/p'; }
wait_ticks() { # NAME MIN TIMEOUT
  local i
  for i in $(seq 1 $(($3 * 4))); do
    [ "$(last_n "$1")" -ge "$2" ] 2>/dev/null && return 0
    alive "$1" || break
    sleep 0.25
  done
  [ "$(last_n "$1")" -ge "$2" ] 2>/dev/null
}

disk=$(fresh_disk snap)
t0=$(now)
boot_vm vm "$disk" "$K/guest/ticker.sh" 180 || fail "no VMM-GUEST-READY within 180 s"
put boot_s "$(since "$t0")"
wait_ticks vm 5 60 || fail "the guest's loop did not tick 5 times (last: $(ticks vm | tail -n1))"

# The last tick seen before the snapshot: the restored loop goes on from at
# least there. (Read before, not after: the original resumes after the
# snapshot and, under TCG, may tick again before the driver looks.)
n_before=$(last_n vm)
t1=$(now)
"$VMM" snapshot --api-sock "$WORK/vm.sock" -o "$WORK/vm.snap" >"$OUT/snapshot.stdout" 2>"$OUT/snapshot.stderr" ||
  fail "vmm snapshot failed: $(tail -n 2 "$OUT/snapshot.stderr" | tr '\n' ' ')"
put snapshot_s "$(since "$t1")"
put snapshot_mb "$(($(du -m "$WORK/vm.snap" | cut -f1)))"
put snapshot_reply "$(tail -n1 "$OUT/snapshot.stdout")"
# The original runs on for a moment; it is stopped before the restore.
n_snap=$(last_n vm)
stop_vm vm
puts original_exit "$VM_RC"
n_orig_end=$(last_n vm)
put tick_before_snapshot "${n_before:-0}"
put tick_at_snapshot "${n_snap:-0}"
log "snapshot after tick $n_before (tick $n_snap when it returned; the original ran to tick $n_orig_end); restoring in $GAP_S s"
sleep "$GAP_S"

t2=$(now)
"$VMM" restore --snapshot "$WORK/vm.snap" --serial "$OUT/restored.serial" --api-sock "$WORK/restored.sock" \
  >"$OUT/restored.stdout" 2>"$OUT/restored.stderr" &
VM_PID[restored]=$!
wait_ticks restored 1 120 || fail "no TICK line after the restore within 120 s: $(tail -n 3 "$OUT/restored.stderr" | tr '\n' ' ')"
put restore_to_first_tick_s "$(since "$t2")"
first=$(ticks restored | head -n1)
puts first_tick_after_restore "$first"
n_first=$(sed -n 's/.* n=\([0-9]*\).*/\1/p' <<<"$first")
t3=$(now)
wait_ticks restored $((n_first + 10)) 120 || FAILS+=("the restored loop did not tick 10 more times in 120 s")
put ten_ticks_s "$(since "$t3")"
last=$(ticks restored | tail -n1)
puts last_tick "$last"
lockups=$(sed -n 's/.* softlockups=\([0-9]*\).*/\1/p' <<<"$last")
clock=$(sed -n 's/.* clocksource=\([0-9]*\).*/\1/p' <<<"$last")
before=$(ticks vm | tail -n1)
lockups0=$(sed -n 's/.* softlockups=\([0-9]*\).*/\1/p' <<<"$before")
clock0=$(sed -n 's/.* clocksource=\([0-9]*\).*/\1/p' <<<"$before")
put softlockups "${lockups:-null}"
put clocksource_complaints "${clock:-null}"
stop_vm restored
puts restored_exit "$VM_RC"

expect "the restored loop goes on from the snapshot (first tick after restore n=$n_first, snapshot after n=$n_before)" \
  eval '[ -n "$n_first" ] && [ "$n_first" -ge "${n_before:-0}" ] && [ "$n_first" -le "$((${n_orig_end:-0} + 1))" ]'
expect "it keeps ticking (10 ticks after the restore)" ge "$(last_n restored)" "$((n_first + 10))"
expect "no soft lockup or RCU stall in dmesg (before the snapshot: ${lockups0:-?}, after the restore: ${lockups:-?})" eq "${lockups:-x}" 0
expect "no clocksource complaint in dmesg (before the snapshot: ${clock0:-?}, after the restore: ${clock:-?})" eq "${clock:-x}" 0
