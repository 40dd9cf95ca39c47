# mysql: MariaDB in a Linux guest on virtio-net, sysbench OLTP (read/write,
# 2 threads) from L1 over TCP through an --enlightened migration, the OLTP
# counterpart of `net` (thesis section 5.4: MySQL under OLTP load). The
# guest prepares its sysbench tables itself; sysbench in L1 must end cleanly
# (exit 0: no fatal query error, no lost connection), report transactions in
# every second after the switch-over, and the rows must all be there at the
# destination. Cassandra is not packaged in Debian (kvm-host/README.md).
# sysbench has no timeout of its own: a guest that dies leaves it waiting,
# so each run is bounded (timeout 124 = the guest stopped answering).
# timeout: 900
source /payload/kvm-host/lib.sh "$@"
source /payload/kvm-host/migrate-common.sh
source /payload/kvm-host/net-common.sh

disk=$(fresh_disk mysql)
t0=$(now)
boot_vm src "$disk" "$K/guest/mysql.sh" 300 || fail "no VMM-GUEST-READY from the guest within 300 s (see src.serial, src.stderr)"
put boot_s "$(since "$t0")"
wait_serial src '^GUEST-MYSQL ' 400 >/dev/null || fail "MariaDB did not start in the guest (see src.serial)"
gm=$(grep -a '^GUEST-MYSQL ' "$OUT/src.serial" | tail -n1 | tr -d '\r')
puts guest_mysql "$gm"
put mysql_ready_s "$(since "$t0")"
expect "MariaDB runs in the guest with the sysbench tables ($gm)" eval '[[ "$gm" == "GUEST-MYSQL ready "* ]]' || fail "no database to load"
wait_tick src 3 300 || fail "the guest's memcached load did not reach tick 3 (last: $(status src))"

SB=(--db-driver=mysql --mysql-host="$GUEST_IP" --mysql-user=sbtest --mysql-password=sbtest --tables=2 --table-size=2000)
t=$(now)
timeout 120 sysbench oltp_read_write "${SB[@]}" --threads=2 --time=20 --report-interval=1 run >"$OUT/sysbench-alone.out" 2>&1 ||
  fail "sysbench against the guest failed before any migration: $(tail -n 3 "$OUT/sysbench-alone.out" | tr '\n' ' ')"
put sysbench_alone_s "$(since "$t")"
tps_alone=$(awk '/transactions:/ { gsub(/[()]/, "", $3); print $3 }' "$OUT/sysbench-alone.out")
put tps_alone "${tps_alone:-0}"
expect "sysbench OLTP from L1 over virtio-net runs against the guest's MariaDB (${tps_alone:-0} transactions/s)" gt "${tps_alone:-0}" 0

# OLTP through the migration.
{
  timeout 180 sysbench oltp_read_write "${SB[@]}" --threads=2 --time=60 --report-interval=1 run 2>&1
  echo "SYSBENCH-EXIT $?"
} | while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done >"$OUT/sysbench.out" &
sb_pid=$!
sleep 8
if migrate_and_check src dst 7010 enlightened m1; then
  check_enlightened_report m1
fi
migrated_at=$(date +%s.%N)
port_after=$(fdb_port)
puts fdb_after "$port_after"
expect "the destination's announcement moved the guest's MAC to tap1 (${port_after:-none})" eval '[ "$port_after" = tap1 ]'
wait "$sb_pid"
# sysbench's per-second rows ("[ 9s ] thds: 2 tps: 3.00 ..."), stamped on arrival.
sb_after=$(awk -v t="$migrated_at" '$2 == "[" && $1 > t { n++; for (i = 1; i < NF; i++) if ($i == "tps:" && $(i + 1) + 0 > 0) ok++ }
  END { printf "%d/%d", ok, n }' "$OUT/sysbench.out")
sb_summary=$(awk '/transactions:|queries:|ignored errors:|reconnects:/ { $1 = ""; sub(/^ +/, ""); printf "%s; ", $0 }' "$OUT/sysbench.out")
puts sysbench "$sb_summary"
puts sysbench_periods_after "$sb_after"
sb_exit=$(grep -a 'SYSBENCH-EXIT' "$OUT/sysbench.out" | awk '{print $3}')
expect "sysbench ran through the migration and exited cleanly (exit ${sb_exit:-none})" eval '[ "${sb_exit:-x}" = 0 ]'
# "ignored errors" are InnoDB deadlocks sysbench retries (2 threads on 2
# small tables have a few per second, with or without a migration).
expect "sysbench lost no connection ($sb_summary)" grep -aq "reconnects: *0 " "$OUT/sysbench.out"
expect "sysbench committed transactions in every second after the switch-over ($sb_after periods)" \
  eval '[ "${sb_after%/*}" = "${sb_after#*/}" ] && [ "${sb_after#*/}" -gt 0 ]'
sb_rc=0
timeout 60 sysbench oltp_read_write "${SB[@]}" --threads=1 --time=3 run >"$OUT/sysbench-after.out" 2>&1 || sb_rc=$?
expect "a new sysbench connection works at the destination (exit $sb_rc)" eval '[ "$sb_rc" = 0 ]'
stop_vm dst
puts dest_exit "$VM_RC"
