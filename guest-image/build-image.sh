#!/usr/bin/env bash
# Runs inside the build chroot (see scripts/guest-image): builds the guest
# module against the kernel tree at /build/linux (read-only) and assembles
# the root file system from the chroot's own Debian packages.
#   build-image.sh KERNEL_RELEASE
# /build/out/src/guest-module and /build/out/src/bitmap-abi/src/wire.rs are the
# module sources; outputs go to /build/out.
set -euo pipefail
release=${1:?usage: build-image.sh KERNEL_RELEASE}
out=/build/out
kdir=/build/linux
moddir=$out/src/guest-module

echo "== guest module (make -C $kdir M=$moddir LLVM=1 modules)"
make -C "$kdir" ARCH=x86_64 LLVM=1 M="$moddir" modules
ko=$(find "$moddir" -name enlighten.ko)
[ -n "$ko" ] || { echo "error: the module build produced no enlighten.ko" >&2; exit 1; }
cp "$ko" "$out/enlighten.ko"
modinfo "$out/enlighten.ko"
vermagic=$(modinfo -F vermagic "$out/enlighten.ko")
case $vermagic in
  "$release "*) ;;
  *) echo "error: module vermagic '$vermagic' does not match kernel $release" >&2; exit 1 ;;
esac

echo "== root file system"
r=$out/rootfs
rm -rf "$r"
mkdir -p "$r"/usr/bin "$r"/usr/sbin "$r"/usr/lib/modules "$r"/usr/lib64 \
  "$r"/proc "$r"/sys "$r"/dev "$r"/tmp "$r"/run "$r"/root "$r"/etc "$r"/mnt "$r"/var/tmp
ln -s usr/bin "$r/bin"
ln -s usr/sbin "$r/sbin"
ln -s usr/lib "$r/lib"
ln -s usr/lib64 "$r/lib64"
chmod 1777 "$r/tmp" "$r/var/tmp"
mknod -m 600 "$r/dev/console" c 5 1
mknod -m 666 "$r/dev/null" c 1 3

# busybox (static) and its applets.
cp /usr/bin/busybox "$r/usr/bin/busybox"
/usr/bin/busybox --list-full | while read -r applet; do
  case $applet in */*) ;; *) continue ;; esac
  [ -e "$r/$applet" ] || [ -L "$r/$applet" ] || ln -s /usr/bin/busybox "$r/$applet"
done

# memcached and the shared libraries it needs (as the chroot's loader
# resolves them).
cp /usr/bin/memcached "$r/usr/bin/memcached"
ldd /usr/bin/memcached | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u |
  while read -r lib; do
    mkdir -p "$r$(dirname "$lib")"
    cp -L "$lib" "$r$lib"
  done
chroot "$r" /usr/bin/memcached --version

# The acceptance test's checker (std-only Rust, static).
rustc --edition 2021 -O -C target-feature=+crt-static -o "$r/usr/bin/enlcheck" "$out/input/enlcheck.rs"
{ chroot "$r" /usr/bin/enlcheck 2>&1 || true; } | grep -q usage
mkdir -p "$r/usr/share/vmm"
cp "$out/input/enlighten-accept.sh" "$r/usr/share/vmm/enlighten-accept.sh"

# The module, init and identity files.
cp "$out/enlighten.ko" "$r/lib/modules/enlighten.ko"
cp "$out/input/init" "$r/init"
chmod 755 "$r/init"
ln -sfn /init "$r/sbin/init"
printf 'root:x:0:0:root:/root:/bin/sh\nmemcache:x:100:100:memcached:/nonexistent:/bin/false\n' >"$r/etc/passwd"
printf 'root:x:0:\nmemcache:x:100:\n' >"$r/etc/group"
echo vmm-guest >"$r/etc/hostname"
printf 'kernel=%s\nbusybox=%s\nmemcached=%s\nmariadb=%s\nsysbench=%s\n' "$release" \
  "$(dpkg-query -W -f '${Version}' busybox-static)" "$(dpkg-query -W -f '${Version}' memcached)" \
  "$(chroot /build/apps /usr/sbin/mariadbd --version | awk '{print $3}')" "$(chroot /build/apps /usr/bin/sysbench --version | awk '{print $2}')" \
  >"$r/etc/vmm-guest-release"

# Reproducible archives: fixed timestamps, sorted entries, root owner.
find "$r" -exec touch -h -d @0 {} +
(cd "$r" && find . -print0 | LC_ALL=C sort -z | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
  gzip -9n >"$out/rootfs.cpio.gz"

# MariaDB and sysbench, bundled in the apps chroot with their libraries,
# share files and an initialized data directory (see bundle-apps.sh): in
# rootfs.ext4 only (~100 MiB; rootfs.cpio.gz stays a small initramfs).
[ -x /build/apps/usr/sbin/mariadbd ] || { echo "error: no application bundle at /build/apps" >&2; exit 1; }
(cd /build/apps && find . ! -type d -print) | while read -r f; do
  mkdir -p "$r/$(dirname "$f")"
  cp -a "/build/apps/$f" "$r/$f"
done
mkdir -p "$r/run/mysqld"
chroot "$r" /usr/sbin/mariadbd --version
chroot "$r" /usr/bin/sysbench --version

find "$r" -exec touch -h -d @0 {} +
size_mb=$(($(du -sm "$r" | cut -f1) * 5 / 4 + 128))
mke2fs -q -t ext4 -L vmm-root -d "$r" -E root_owner=0:0 "$out/rootfs.ext4" "${size_mb}M"
ls -l "$out"/rootfs.cpio.gz "$out"/rootfs.ext4 "$out"/enlighten.ko
