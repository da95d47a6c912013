#!/usr/bin/env bash
# Makes sure a local Redis (127.0.0.1:6379) and MariaDB (127.0.0.1:3306, root without password)
# answer, installing and starting them if needed. Idempotent: on a machine where both already run
# it only checks them. Used by the quickstart, the test command and CI.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

redis_up() { have redis-cli && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
mysql_up() { have mariadb-admin && mariadb-admin -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1; }

missing=()
have redis-server || missing+=(redis-server)
have mariadbd || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "services: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! redis_up; then
  echo "services: starting redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/qsys.log
fi

if ! mysql_up; then
  echo "services: starting mariadb"
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  if [ ! -d /var/lib/mysql/mysql ]; then
    as_root mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  # Its own pid file: "running" was decided above by the port answering, and start-stop-daemon
  # matching on --exec alone would take any mariadbd on the machine (one in a container or
  # another namespace) for this one and start nothing.
  as_root start-stop-daemon --start --oknodo --background --make-pidfile \
    --pidfile /run/mysqld/qsys-services.pid --exec /usr/sbin/mariadbd -- \
    --user=mysql --bind-address=127.0.0.1 --port=3306
fi

for _ in $(seq 1 60); do
  if redis_up && mysql_up; then break; fi
  sleep 0.5
done
redis_up || { echo "services: redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
mysql_up || { echo "services: mariadb does not answer on 127.0.0.1:3306" >&2; exit 1; }

# root over TCP without a password, as the tests and the quickstart expect. A fresh Debian install
# authenticates root@localhost by unix socket only; allow the empty password too (local only).
if ! mariadb -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1; then
  as_root mariadb -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD(''); FLUSH PRIVILEGES;"
fi
mariadb -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null
echo "services: redis and mariadb are up"
