#!/usr/bin/env bash
# Runs inside the apps chroot (see scripts/guest-image): collects MariaDB and
# sysbench with every library they load and the files they read into a
# bundle directory that the image stage copies into the root file system.
#   bundle-apps.sh BUNDLE_DIR
# Also initializes a MariaDB data directory (system tables only; the guest
# scripts create their own databases and users).
set -euo pipefail
b=${1:?usage: bundle-apps.sh BUNDLE_DIR}
mkdir -p "$b"
find "$b" -mindepth 1 -delete

bins=(/usr/sbin/mariadbd /usr/bin/mariadb /usr/bin/mariadb-admin /usr/bin/sysbench)
for f in "${bins[@]}"; do
  [ -x "$f" ] || { echo "error: $f is missing in the apps chroot" >&2; exit 1; }
  mkdir -p "$b$(dirname "$f")"
  cp -L "$f" "$b$f"
done
# Every shared library, as this chroot's loader resolves them.
for f in "${bins[@]}"; do
  ldd "$f" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'
done | sort -u | while read -r lib; do
  mkdir -p "$b$(dirname "$lib")"
  cp -L "$lib" "$b$lib"
done
# Error messages, character sets, the bootstrap SQL; sysbench's Lua tests.
mkdir -p "$b/usr/share"
cp -a /usr/share/mariadb "$b/usr/share/mariadb"
cp -a /usr/share/sysbench "$b/usr/share/sysbench"

# A data directory with the system tables, made by the server itself (an
# 8 MiB redo log, not 96: the guest starts with the same option).
db=/tmp/vmm-mariadb
rm -rf "$db"
mariadb-install-db --user=root --datadir="$db" --skip-test-db --skip-name-resolve --force \
  --innodb-log-file-size=8M --auth-root-authentication-method=socket >/tmp/install-db.log 2>&1 ||
  { cat /tmp/install-db.log >&2; exit 1; }
mkdir -p "$b/var/lib"
cp -a "$db" "$b/var/lib/mysql"
rm -rf "$db"

"$b/usr/sbin/mariadbd" --version
"$b/usr/bin/sysbench" --version
du -sh "$b"
