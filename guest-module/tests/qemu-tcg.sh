#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Boots the project's guest kernel + initramfs (from scripts/guest-image) under
# QEMU TCG and checks that:
#   - the guest module loads at boot and prints its load line with the ABI
#     version and device ID of bitmap-abi/src/wire.rs;
#   - /init prints its marker with module=loaded;
#   - memcached from the root file system runs and answers;
#   - rmmod of the module succeeds, it prints its unload line and is gone;
#   - the kernel reports no oops, BUG, WARNING or panic;
#   - the guest powers off by itself.
#   - the ext4 image boots as root on virtio-blk and loads the module too.
# Prints the boot-to-marker times. Exits non-zero on any failure.
#   guest-module/tests/qemu-tcg.sh [--timeout SECONDS] [--keep-log FILE] [-- guest-image options]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
timeout_s=180
keep_log=""
gi_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout_s=$2; shift 2 ;;
    --keep-log) keep_log=$2; shift 2 ;;
    --) shift; gi_args=("$@"); break ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "qemu-tcg: unknown option '$1'" >&2; exit 2 ;;
  esac
done

fail() { echo "qemu-tcg: FAIL: $*" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null 2>&1 || fail "qemu-system-x86_64 not found (scripts/setup installs it)"

echo "qemu-tcg: building or reusing the guest image (scripts/guest-image)" >&2
json=$("$repo/scripts/guest-image" "${gi_args[@]}" | tail -n 1) || fail "scripts/guest-image failed"
field() { printf '%s' "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
kernel=$(field kernel) || fail "no kernel in guest-image output: $json"
rootfs=$(field rootfs) || fail "no rootfs in guest-image output: $json"
rootfs_ext4=$(field rootfs_ext4) || fail "no rootfs_ext4 in guest-image output: $json"
{ [ -f "$kernel" ] && [ -f "$rootfs" ] && [ -f "$rootfs_ext4" ]; } || fail "guest-image printed missing paths: $json"

# Expected values from the shared ABI source (the module prints them).
wire="$repo/bitmap-abi/src/wire.rs"
abi_version=$(sed -n 's/^pub const VERSION: u16 = \([0-9]*\);/\1/p' "$wire")
device_id=$(sed -n 's/^pub const DEVICE_ID: u32 = \([0-9]*\);/\1/p' "$wire")
{ [ -n "$abi_version" ] && [ -n "$device_id" ]; } || fail "cannot read VERSION/DEVICE_ID from $wire"

# The guest's test, passed base64-encoded as vmm.run (no quoting issues).
guest_script=$(cat <<'EOS'
set -u
echo "T: modules: $(cat /proc/modules)"
grep -q '^enlighten ' /proc/modules || { echo "T-FAIL: enlighten not in /proc/modules"; exit 1; }
memcached -u memcache -p 11211 -l 127.0.0.1 -d || { echo "T-FAIL: memcached did not start"; exit 1; }
i=0; v=""
while [ $i -lt 50 ]; do
  v=$(printf 'set k 0 0 5\r\nhello\r\nget k\r\nversion\r\nquit\r\n' | nc 127.0.0.1 11211 2>/dev/null | tr -d '\r' | tr '\n' ' ')
  case $v in *VERSION*) break ;; esac
  i=$((i + 1)); sleep 0.2
done
echo "T: memcached says: $v"
case $v in *"STORED VALUE k 0 5 hello END VERSION"*) echo "T-OK: memcached" ;; *) echo "T-FAIL: memcached"; exit 1 ;; esac
[ -r /proc/kpageflags ] && [ -r /proc/self/pagemap ] && echo "T-OK: kpageflags and pagemap" || { echo "T-FAIL: no /proc/kpageflags or pagemap"; exit 1; }
rmmod enlighten || { echo "T-FAIL: rmmod enlighten failed"; exit 1; }
grep -q '^enlighten ' /proc/modules && { echo "T-FAIL: enlighten still loaded after rmmod"; exit 1; }
echo "T-OK: rmmod"
exit 0
EOS
)
run_b64=$(printf '%s\n' "$guest_script" | base64 -w0)

log=$(mktemp /tmp/qemu-tcg.XXXXXX.log)
log2=$(mktemp /tmp/qemu-tcg.XXXXXX.log)
cleanup() {
  if [ -n "$keep_log" ]; then cat "$log" "$log2" >"$keep_log"; fi
  rm -f "$log" "$log2" "$log.marker" "$log2.marker"
}
trap cleanup EXIT

# boot LOG QEMU-ARGS...: runs QEMU under TCG with a timeout, copying the
# console to LOG and stderr; sets rc, marker_s (QEMU start to the init
# marker) and total_s (QEMU start to exit).
boot() {
  local out=$1
  shift
  local start
  start=$EPOCHREALTIME
  marker_s="none"
  set +e
  timeout --kill-after=5 "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -m 512M -smp 2 \
    -nographic -no-reboot -kernel "$kernel" "$@" </dev/null 2>&1 |
    while IFS= read -r line; do
      line=${line%$'\r'}
      printf '%s\n' "$line" >>"$out"
      printf '%s\n' "$line" >&2
      case $line in
        VMM-GUEST-READY*) echo "$start $EPOCHREALTIME" >"$out.marker" ;;
      esac
    done
  rc=${PIPESTATUS[0]}
  set -e
  if [ -f "$out.marker" ]; then
    marker_s=$(awk '{ printf "%.2f", $2 - $1 }' "$out.marker")
  fi
  total_s=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    fail "QEMU timed out after ${timeout_s}s (guest did not power off)"
  fi
  [ "$rc" -eq 0 ] || fail "QEMU exited with status $rc"
}

echo "qemu-tcg: boot 1: $kernel with initramfs $rootfs (timeout ${timeout_s}s)" >&2
boot "$log" -initrd "$rootfs" -append "console=ttyS0 panic=-1 vmm.run=$run_b64"
check() { grep -qE "$1" "${3:-$log}" || fail "$2"; }
check "enlighten: loaded, ABI version $abi_version, device id $device_id\b" \
  "module load line 'enlighten: loaded, ABI version $abi_version, device id $device_id' missing"
check '^VMM-GUEST-READY module=loaded ' "init marker 'VMM-GUEST-READY module=loaded' missing"
check '^T-OK: memcached' "memcached check failed"
check '^T-OK: kpageflags and pagemap' "/proc/kpageflags or /proc/PID/pagemap missing"
check '^T-OK: rmmod' "rmmod check failed"
check 'enlighten: unloaded' "module unload line 'enlighten: unloaded' missing"
check '^VMM-GUEST-EXIT status=0$' "guest test script failed"
check 'reboot: Power down' "guest did not power off cleanly"
if grep -nE 'Oops|BUG:|WARNING:|Kernel panic|Call Trace|T-FAIL' "$log" >&2; then
  fail "kernel or guest test reported an error (lines above)"
fi
initramfs_marker=$marker_s initramfs_total=$total_s

# Boot 2: the ext4 image as root on virtio-blk (virtio-pci), read-only and
# with snapshot=on so the cached image is never written; exercises vmm.test
# and the kernel's quote handling.
echo "qemu-tcg: boot 2: ext4 root file system $rootfs_ext4 on virtio-blk" >&2
boot "$log2" -drive "file=$rootfs_ext4,if=virtio,format=raw,snapshot=on" \
  -append 'console=ttyS0 panic=-1 root=/dev/vda ro vmm.test="grep -q ^enlighten /proc/modules && grep -q ^/dev/root.*ext4 /proc/mounts && echo EXT4-ROOT-OK"'
check '^VMM-GUEST-READY module=loaded ' "ext4 boot: init marker missing" "$log2"
check '^EXT4-ROOT-OK$' "ext4 boot: module not loaded or root is not ext4 on /dev/vda" "$log2"
check '^VMM-GUEST-EXIT status=0$' "ext4 boot: vmm.test failed" "$log2"
if grep -nE 'Oops|BUG:|WARNING:|Kernel panic|Call Trace' "$log2" >&2; then
  fail "ext4 boot: kernel reported an error (lines above)"
fi
echo "qemu-tcg: PASS: initramfs boot-to-marker ${initramfs_marker}s (whole run ${initramfs_total}s); ext4 boot-to-marker ${marker_s}s (whole run ${total_s}s)"
