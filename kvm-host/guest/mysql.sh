# L2 guest (busybox sh): eth0 (virtio-net) at 10.0.2.15/24, MariaDB on
# every address with a sysbench database (2 tables of 2000 rows, made here
# over the socket), then memcached and the same load as net.sh (its
# MC-STATUS ticks are what the migration checks follow).
echo "GUEST nproc=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || echo "GUEST eth0 failed"
mkdir -p /run/mysqld
S=/run/mysqld/mysqld.sock
mariadbd --no-defaults --user=root --datadir=/var/lib/mysql --socket=$S --bind-address=0.0.0.0 --skip-name-resolve \
  --innodb-buffer-pool-size=64M --innodb-log-file-size=8M --innodb-use-native-aio=0 --max-connections=32 --log-error=/tmp/mariadb.err &
i=0
while ! mariadb-admin --socket=$S ping >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.5; i=$((i + 1)); done
SB="--db-driver=mysql --mysql-socket=$S --mysql-user=sbtest --mysql-password=sbtest --tables=2 --table-size=2000"
if mariadb --socket=$S -e "CREATE DATABASE sbtest; CREATE USER sbtest@'%' IDENTIFIED BY 'sbtest'; GRANT ALL ON sbtest.* TO sbtest@'%'" &&
  sysbench oltp_read_write $SB prepare >/tmp/prepare.log 2>&1; then
  echo "GUEST-MYSQL ready mariadb=$(mariadbd --version | awk '{print $3}') after ${i} polls"
else
  echo "GUEST-MYSQL failed"
  tail -n 15 /tmp/mariadb.err /tmp/prepare.log
fi
memcached -u root -m 32 -p 11211 -l 0.0.0.0 -d || echo "GUEST memcached failed to start"
i=0
while ! enlcheck mc-verify 11211 0 0 >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
enlcheck fill 11211 16
exec enlcheck mc-load 11211 50 2000
