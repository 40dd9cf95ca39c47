# shellcheck shell=bash
# Shared by the scenario scripts (kvm-host/scenarios/*.sh), which run inside
# L1 as `bash SCRIPT WORK OUT`: WORK is a scratch directory on tmpfs (disk
# copies, snapshots), OUT the scenario's log directory on the payload disk.
# A scenario records figures with put/puts, checks with expect, ends with
# exit (or fail); the EXIT trap writes OUT/result.json and stops every vmm
# it started.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

WORK=${1:?usage: SCRIPT WORK OUT}
OUT=${2:?usage: SCRIPT WORK OUT}
P=/payload
K=$P/kvm-host
VMM=$P/vmm
BZIMAGE=$P/bzImage
ROOTFS=$P/rootfs.ext4
L2_MEM=${L2_MEM:-512M}
L2_VCPUS=${L2_VCPUS:-2}
# The guest's command line (guest-image/init: vmm.run=<base64 script>,
# vmm.halt=reboot: reboot -f at the end, which ends vmm through the i8042).
L2_CMDLINE="console=ttyS0 reboot=k panic=1 root=/dev/vda rw vmm.halt=reboot"
SCENARIO=$(basename "$0" .sh)
RESULT=$OUT/result.json
T_START=$(date +%s.%N)

echo '{}' >"$RESULT.tmp"
FAILS=()
declare -A VM_PID=()
# Extra options of every `vmm run` / `vmm receive` a scenario starts (e.g. --net).
VMM_RUN_ARGS=()
VMM_RECV_ARGS=()

log() { echo "[$(elapsed)s] $*"; }
elapsed() { awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

# put KEY JSON: a figure (raw JSON value; non-JSON is stored as a string).
put() {
  local k=$1 v=$2
  if jq -e . >/dev/null 2>&1 <<<"$v"; then
    jq -c --arg k "$k" --argjson v "$v" '.[$k] = $v' "$RESULT.tmp" >"$RESULT.tmp2" && mv "$RESULT.tmp2" "$RESULT.tmp"
  else
    puts "$k" "$v"
  fi
}
# puts KEY STRING
puts() { jq -c --arg k "$1" --arg v "$2" '.[$k] = $v' "$RESULT.tmp" >"$RESULT.tmp2" && mv "$RESULT.tmp2" "$RESULT.tmp"; }

# expect WHAT CMD...: a check; CMD's status decides. Failures are collected
# (the scenario goes on) and reported in "error".
expect() {
  local what=$1
  shift
  if "$@"; then
    log "ok: $what"
  else
    log "FAIL: $what"
    FAILS+=("$what")
  fi
}
# fail WHY: a failure that ends the scenario.
fail() {
  log "FAIL (fatal): $*"
  FAILS+=("$*")
  exit 1
}
# Numeric comparisons for expect: ge A B, le A B, eq A B (integers or decimals).
ge() { awk -v a="${1:-x}" -v b="${2:-x}" 'BEGIN { exit !(a ~ /^-?[0-9.]+$/ && b ~ /^-?[0-9.]+$/ && a + 0 >= b + 0) }'; }
gt() { awk -v a="${1:-x}" -v b="${2:-x}" 'BEGIN { exit !(a ~ /^-?[0-9.]+$/ && b ~ /^-?[0-9.]+$/ && a + 0 > b + 0) }'; }
eq() { awk -v a="${1:-x}" -v b="${2:-x}" 'BEGIN { exit !(a ~ /^-?[0-9.]+$/ && b ~ /^-?[0-9.]+$/ && a + 0 == b + 0) }'; }
# within_pct A B PCT: |A - B| <= PCT% of B
within_pct() { awk -v a="${1:-x}" -v b="${2:-x}" -v p="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/ && d <= b * p / 100) }'; }
is_true() { [ "$1" = true ]; }

finish() {
  local rc=$?
  trap - EXIT
  stop_all_vms
  local ok=true err=""
  if [ ${#FAILS[@]} -gt 0 ]; then
    ok=false
    err=$(printf '%s; ' "${FAILS[@]}")
    err=${err%; }
  elif [ $rc -ne 0 ]; then
    ok=false
    err="driver exited with status $rc"
  fi
  put scenario_s "$(elapsed)"
  jq -c --argjson ok "$ok" --arg e "$err" '. + {ok: $ok} + (if $e == "" then {} else {error: $e} end)' "$RESULT.tmp" >"$RESULT"
  rm -f "$RESULT.tmp"
  log "result: $(cat "$RESULT")"
  exit $rc
}
trap finish EXIT

# ------------------------------------------------------------ L2 guests

# guest_cmdline SCRIPT_FILE: the kernel command line that runs the script
# (comment lines and indentation dropped: the kernel keeps 2048 bytes).
guest_cmdline() { echo "$L2_CMDLINE vmm.run=$(sed -e 's/^[[:space:]]*//' -e '/^#/d' "$1" | base64 -w0)"; }

# fresh_disk NAME: a private copy of the guest's root file system (the guest writes to it).
fresh_disk() {
  cp --sparse=always "$ROOTFS" "$WORK/$1.ext4"
  echo "$WORK/$1.ext4"
}

# start_vm NAME DISK GUEST_SCRIPT: boots L2 with vmm run in the background;
# its serial output goes to OUT/NAME.serial, stderr to OUT/NAME.stderr, API on WORK/NAME.sock.
start_vm() {
  local name=$1 disk=$2 script=$3 cmdline
  cmdline=$(guest_cmdline "$script")
  [ ${#cmdline} -lt 1900 ] || fail "guest script $script too long for the kernel command line (${#cmdline} bytes)"
  log "vmm run $name: --mem $L2_MEM --vcpus $L2_VCPUS --disk $disk, guest script $(basename "$script")"
  "$VMM" run --kernel "$BZIMAGE" --disk "$disk" --mem "$L2_MEM" --vcpus "$L2_VCPUS" --cmdline "$cmdline" \
    "${VMM_RUN_ARGS[@]}" --serial "$OUT/$name.serial" --api-sock "$WORK/$name.sock" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  VM_PID[$name]=$!
}

# boot_vm NAME DISK GUEST_SCRIPT [TIMEOUT]: start_vm, then waits for the
# guest's VMM-GUEST-READY. Under TCG the nested SVM host now and then kills
# an L2 guest while it boots (KVM_EXIT_SHUTDOWN, "guest triple fault", about
# one boot in ten, never after the guest is up; kvm-host/README.md), or one of
# its vCPUs never runs again during the boot (an RCU stall on it before the
# guest is up), or the boot just never reaches VMM-GUEST-READY: then the boot
# is retried once on a fresh copy of the disk (a second failure fails it),
# the first attempt's logs kept as NAME.try1.*, and the figure boot_retries
# counts it.
BOOT_RETRIES=0
boot_vm() {
  local name=$1 disk=$2 script=$3 t=${4:-180}
  start_vm "$name" "$disk" "$script"
  wait_serial "$name" 'VMM-GUEST-READY' "$t" && return 0
  local why
  if grep -aq 'triple fault' "$OUT/$name.stderr" 2>/dev/null; then
    why="died: $(grep -a 'triple fault' "$OUT/$name.stderr" | tail -n1 | cut -c1-200)"
  elif grep -aq 'rcu_sched detected stalls' "$OUT/$name.serial" 2>/dev/null; then
    # A vCPU that never runs again while the kernel boots (an RCU stall on
    # it before the guest is up; the NMI gets no answer).
    why="a vCPU stalled while booting: $(grep -a 'rcu: .*-\.\.\.' "$OUT/$name.serial" | tail -n1 | cut -c1-120)"
  elif alive "$name"; then
    why="no VMM-GUEST-READY within $t s; serial ends: $(tail -n1 "$OUT/$name.serial" 2>/dev/null | tr -d '\r' | cut -c1-120)"
  else
    why="the VMM ended before VMM-GUEST-READY: $(tail -n1 "$OUT/$name.stderr" 2>/dev/null | cut -c1-160)"
  fi
  alive "$name" && kill -KILL "${VM_PID[$name]}" 2>/dev/null
  wait_vm "$name" 5
  log "the L2 guest $name failed while booting ($why); booting it once more"
  local f
  for f in serial stderr stdout; do mv -f "$OUT/$name.$f" "$OUT/$name.try1.$f" 2>/dev/null; done
  BOOT_RETRIES=$((BOOT_RETRIES + 1))
  put boot_retries "$BOOT_RETRIES"
  cp --sparse=always "$ROOTFS" "$disk"
  start_vm "$name" "$disk" "$script"
  wait_serial "$name" 'VMM-GUEST-READY' "$t"
}

# start_receive NAME PORT: vmm receive on 127.0.0.1:PORT (serial OUT/NAME.serial, API WORK/NAME.sock).
start_receive() {
  local name=$1 port=$2
  [ -f "$WORK/key" ] || (umask 077; head -c 32 /dev/urandom >"$WORK/key")
  chmod 600 "$WORK/key"
  log "vmm receive $name on 127.0.0.1:$port"
  "$VMM" receive --listen "127.0.0.1:$port" --key-file "$WORK/key" --same-paths "${VMM_RECV_ARGS[@]}" --serial "$OUT/$name.serial" \
    --api-sock "$WORK/$name.sock" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  VM_PID[$name]=$!
  local i
  for i in $(seq 1 100); do
    ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && return 0
    alive "$name" || fail "vmm receive $name died: $(tail -n 3 "$OUT/$name.stderr" | tr '\n' ' ')"
    sleep 0.2
  done
  fail "vmm receive $name is not listening on port $port after 20 s"
}

alive() { [ -n "${VM_PID[$1]:-}" ] && kill -0 "${VM_PID[$1]}" 2>/dev/null; }

# wait_vm NAME TIMEOUT: waits for the vmm process to end; sets VM_RC to its
# exit status ("timeout" if it still runs, "none" if there is no such process).
VM_RC=none
wait_vm() {
  local name=$1 t=$2 i pid=${VM_PID[$1]:-}
  VM_RC=none
  [ -n "$pid" ] || return 0
  for i in $(seq 1 $((t * 5))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    VM_RC=timeout
    return 0
  fi
  VM_RC=0
  wait "$pid" 2>/dev/null || VM_RC=$?
  unset "VM_PID[$name]"
}

# stop_vm NAME: asks the VMM to shut down, kills it after 20 s; sets VM_RC
# (its exit status, or killed).
stop_vm() {
  local name=$1
  if alive "$name"; then
    api "$name" shutdown >/dev/null 2>&1
    wait_vm "$name" 20
    if [ "$VM_RC" = timeout ]; then
      kill -KILL "${VM_PID[$name]}" 2>/dev/null
      wait_vm "$name" 5
      VM_RC=killed
    fi
  else
    wait_vm "$name" 1
  fi
}

stop_all_vms() {
  local n
  for n in "${!VM_PID[@]}"; do
    if alive "$n"; then
      api "$n" shutdown >/dev/null 2>&1
    fi
  done
  local i
  for i in $(seq 1 25); do
    local any=0
    for n in "${!VM_PID[@]}"; do alive "$n" && any=1; done
    [ $any -eq 0 ] && break
    sleep 0.2
  done
  for n in "${!VM_PID[@]}"; do
    alive "$n" && kill -KILL "${VM_PID[$n]}" 2>/dev/null
  done
  return 0
}

# api NAME COMMAND: one API request to the VMM NAME.
api() { timeout 30 "$VMM" api --api-sock "$WORK/$1.sock" "$2"; }

# wait_serial NAME REGEX TIMEOUT: waits until the serial log matches (extended regex).
wait_serial() {
  local name=$1 re=$2 t=$3 i
  for i in $(seq 1 $((t * 4))); do
    grep -aEq "$re" "$OUT/$name.serial" 2>/dev/null && return 0
    if ! alive "$name"; then
      grep -aEq "$re" "$OUT/$name.serial" 2>/dev/null && return 0
      log "vmm $name ended while waiting for /$re/: $(tail -n 3 "$OUT/$name.stderr" 2>/dev/null | tr '\n' ' ')"
      return 1
    fi
    sleep 0.25
  done
  log "timed out after $t s waiting for /$re/ in $name.serial"
  return 1
}

# ------------------------------------------------------- memcached status
# The guest runs kvm-host/guest/memcached.sh: enlcheck mc-load prints
#   MC-STATUS tick=N uptime_ms=N written=N verified_ok=N verified_bad=N ...
# every 2 s (guest-image/enlcheck.rs).

# status NAME: the last MC-STATUS line of NAME's serial log (empty if none).
# Only complete lines count: the guest may be half-way through printing one.
# The log is copied first and only the copy is read: the guest may add to the
# log between a look at its last byte and the read (a half line was once taken
# for the last status, with every field empty).
status() {
  local f=$OUT/$1.serial snap
  [ -f "$f" ] || return 0
  snap=$(mktemp) || return 0
  cp "$f" "$snap"
  if [ "$(tail -c1 "$snap" | od -An -tx1 | tr -d ' ')" = 0a ]; then cat "$snap"; else sed '$d' "$snap"; fi |
    grep -a '^MC-STATUS ' | tail -n1 | tr -d '\r'
  rm -f "$snap"
}
# field LINE KEY
field() { sed -n "s/.* $2=\\([^ ]*\\).*/\\1/p" <<<" $1"; }
# tick NAME: the last tick number (0 if none).
tick() {
  local t
  t=$(field "$(status "$1")" tick)
  echo "${t:-0}"
}

# wait_tick NAME MIN TIMEOUT: waits until NAME's serial log has a status line with tick >= MIN.
wait_tick() {
  local name=$1 min=$2 t=$3 i
  for i in $(seq 1 $((t * 4))); do
    [ "$(tick "$name")" -ge "$min" ] && return 0
    alive "$name" || {
      [ "$(tick "$name")" -ge "$min" ] && return 0
      log "vmm $name ended while waiting for tick $min: $(tail -n 3 "$OUT/$name.stderr" 2>/dev/null | tr '\n' ' ')"
      return 1
    }
    sleep 0.25
  done
  log "timed out after $t s waiting for tick $min on $name (last: $(status "$name"))"
  return 1
}

# status_json LINE: the status line as a JSON object of numbers.
status_json() {
  sed 's/^MC-STATUS //' <<<"$1" | tr ' ' '\n' | awk -F= 'NF == 2 { printf "%s\"%s\": %s", (n++ ? ", " : "{"), $1, $2 } END { print (n ? "}" : "{}") }'
}

# check_memcached LINE BEFORE_WRITTEN WHAT: values written before are still right.
check_memcached() {
  local line=$1 before=$2 what=$3
  local ok bad missing written
  ok=$(field "$line" verified_ok)
  bad=$(field "$line" verified_bad)
  missing=$(field "$line" verified_missing)
  written=$(field "$line" written)
  expect "$what: memcached answers every key written so far with its value (ok=$ok bad=$bad missing=$missing of written=$written)" \
    eval 'eq "$bad" 0 && eq "$missing" 0 && eq "$ok" "$written"'
  expect "$what: the keys written before the migration are among them (written=$written >= $before)" ge "$written" "$before"
}

# guest_complaints NAME: "softlockups clocksource" of the last status line.
guest_complaints() {
  local s
  s=$(status "$1")
  echo "$(field "$s" softlockups) $(field "$s" clocksource)"
}

# ------------------------------------------------------------ migration

# migrate SRC PORT MODE REPORT_NAME: vmm migrate of SRC to 127.0.0.1:PORT; the
# report goes to OUT/REPORT_NAME.json, stdout/stderr beside it. Returns its status.
migrate() {
  local src=$1 port=$2 mode=$3 rn=$4 rc=0
  log "vmm migrate $src -> 127.0.0.1:$port --mode $mode"
  timeout 900 "$VMM" migrate --api-sock "$WORK/$src.sock" --to "127.0.0.1:$port" --mode "$mode" \
    --key-file "$WORK/key" --report "$OUT/$rn.json" >"$OUT/$rn.stdout" 2>"$OUT/$rn.stderr" || rc=$?
  log "vmm migrate exited with status $rc: $(tail -n 1 "$OUT/$rn.stderr" 2>/dev/null | cut -c1-300)"
  return $rc
}

# report_get REPORT_NAME JQ_FILTER: a value of the migration report (empty if none).
report_get() {
  [ -s "$OUT/$1.json" ] || return 0
  jq -c "$2 // empty" "$OUT/$1.json" 2>/dev/null
}

# put_report_figures PREFIX REPORT_NAME: the report's timings and sizes as figures.
put_report_figures() {
  local p=$1 rn=$2 v
  [ -s "$OUT/$rn.json" ] || return 0
  v=$(jq -c '{downtime_ms, total_duration_ms, execution_transfer_ms, enlightenment_ms, suspension_ms,
      bytes, free_pages_sent, pages, fault_latency_ms, integrity_match: .integrity.match,
      rounds: (if (.rounds | type) == "array" then (.rounds | length) else null end), reconnections}
      | with_entries(select(.value != null))' "$OUT/$rn.json" 2>/dev/null) || return 0
  put "${p}report" "$v"
}

# migration_error REPORT_NAME: the error a failed migrate printed.
migration_error() {
  local e
  e=$(report_get "$1" .error | tr -d '"')
  [ -n "$e" ] || e=$(grep -a 'vmm:' "$OUT/$1.stderr" 2>/dev/null | tail -n1)
  echo "${e:-?}" | cut -c1-400
}
