# Helpers the scripts source: installing Debian packages, finding and
# running PostgreSQL, ports on loopback, and reading callgrind's counts.
# shellcheck shell=bash

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs the named Debian packages, if any are named.
install_packages() {
  [ $# -gt 0 ] || return 0
  printf '[%s] installing %s from Debian packages\n' "$(basename "$0")" "$*" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The newest installed PostgreSQL's bin directory, or nothing.
pg_bin() {
  local initdb
  initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
  [ -n "$initdb" ] && dirname "$initdb"
}

# Redis and PostgreSQL packages, for those of them missing.
missing_server_packages() {
  { command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || echo redis-server redis-tools
  [ -n "$(pg_bin)" ] || echo postgresql
}

# Runs a PostgreSQL command as the user the server runs as: PostgreSQL
# refuses to run as root, so as root that is the `postgres` user.
pg_user=$(id -un)
run_pg() { "$@"; }
if [ "$(id -u)" -eq 0 ]; then
  pg_user=postgres
  run_pg() { su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; }
fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port on loopback that nothing listens on, below the kernel's range for
# outgoing connections (from 32768), so that no client's socket holds it
# when the server binds it; a Redis Cluster node's bus (port + 10000) is
# below that range too.
free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$((10000 + RANDOM % 12000))
    if ! listening "$port"; then
      echo "$port"
      return
    fi
  done
  echo "no free port found" >&2
  exit 1
}

# Waits up to `tenths` tenths of a second (default 100) for `what` to
# listen on `port`.
wait_for() {
  local what=$1 port=$2 tenths=${3:-100}
  for _ in $(seq 1 "$tenths"); do
    if listening "$port"; then return; fi
    sleep 0.1
  done
  echo "$what did not start on port $port" >&2
  exit 1
}

# The instructions a callgrind output file counted in all, or in the
# functions whose names match `pattern`.
callgrind_total() {
  callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}
callgrind_in() {
  callgrind_annotate "$1" 2>/dev/null |
    awk -v pattern="$2" '$0 ~ pattern { gsub(",", "", $1); s += $1 } END { print s + 0 }'
}
