#!/usr/bin/env bash
# Runs inside the build chroot (see scripts/guest-image): configures and
# builds the kernel tree bind-mounted at /build/linux with LLVM=1.
#   build-kernel.sh JOBS
# /build/input/kernel.config is the config fragment.
set -euo pipefail
jobs=${1:?usage: build-kernel.sh JOBS}
frag=/build/input/kernel.config
cd /build/linux

mk() { make ARCH=x86_64 LLVM=1 "$@"; }

echo "== toolchain: $(rustc --version); $(bindgen --version 2>&1 | head -1); $(clang --version | head -1)"
mk rustavailable || { echo "error: the kernel does not accept this Rust toolchain (make rustavailable)" >&2; exit 1; }

echo "== configure: tinyconfig + kvm_guest.config + $frag"
mk tinyconfig
scripts/kconfig/merge_config.sh -m .config kernel/configs/kvm_guest.config "$frag"
mk olddefconfig

# Every option the fragment asks for must have survived olddefconfig.
missing=0
: >config-check.txt
while IFS= read -r line; do
  case $line in '' | '#'*) continue ;; esac
  case $line in
    CONFIG_*=*) ;;
    *) echo "error: $frag: unsupported line '$line'" >&2; exit 1 ;;
  esac
  if ! grep -qxF "$line" .config; then
    name=${line%%=*}
    got=$(grep -E "^($name=|# $name is not set)" .config || echo "absent (dependencies not met or no such option)")
    echo "config: requested $line, got: $got" | tee -a config-check.txt >&2
    missing=$((missing + 1))
  fi
done <"$frag"
if [ $missing -ne 0 ]; then
  echo "error: $missing requested kernel option(s) did not end up in .config (see above)" >&2
  exit 1
fi
echo "config: all $(grep -c '^CONFIG_' "$frag") requested options are set" | tee -a config-check.txt

echo "== build (-j$jobs)"
mk -j"$jobs" all
ls -l arch/x86/boot/bzImage Module.symvers
