# Helpers the scripts source: installing Debian packages, finding and
# running PostgreSQL, building Valkey, ports on loopback, and reading callgrind's counts.
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

# The path of a Valkey server, built on first use into target/servers
# from the source Debian ships: Debian 12 packages no Valkey, and its
# Redis 7.0 lacks `SET … IFEQ`, which the Redis store uses where a server
# has it. About a minute on two cores; later runs find it built.
valkey_version=8.1.1
valkey_source_sha256=d9bbd82eecb82f359e649a0007ad3dc1b47cc15afa626348ca86b73c4ae2c7ee
valkey_server() {
  local dir build tarball tool missing=()
  dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/servers/valkey-$valkey_version"
  if [ ! -x "$dir/src/valkey-server" ]; then
    for tool in make:make cc:gcc curl:curl xz:xz-utils; do
      command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    # Each step checks its own failure: callers run this inside $(…),
    # where `set -e` does not stop it.
    if [ ${#missing[@]} -gt 0 ]; then
      install_packages "${missing[@]}" libc6-dev || return 1
    fi
    printf '[%s] building Valkey %s into %s\n' "$(basename "$0")" "$valkey_version" "$dir" >&2
    # Built aside and moved into place whole, so that a build cut short,
    # or another script's at the same time, never leaves half of one.
    build="$dir.build.$$"
    tarball="$build.tar.xz"
    rm -rf "$build" && mkdir -p "$build" || return 1
    if ! curl -fsSL -o "$tarball" \
      "https://deb.debian.org/debian/pool/main/v/valkey/valkey_$valkey_version+dfsg1.orig.tar.xz" \
      || ! echo "$valkey_source_sha256  $tarball" | sha256sum --check --quiet >&2 \
      || ! tar -xJf "$tarball" -C "$build" --strip-components=1 \
      || ! make -C "$build" -j"$(nproc)" MALLOC=libc BUILD_TLS=no valkey-server >"$build/build.log" 2>&1; then
      tail -n 30 "$build/build.log" >&2 2>/dev/null
      rm -rf "$build" "$tarball"
      echo "could not download, check or build Valkey $valkey_version" >&2
      return 1
    fi
    rm -f "$tarball"
    # A directory left without a server by an older, cut-short build.
    [ -x "$dir/src/valkey-server" ] || rm -rf "$dir"
    mv -T "$build" "$dir" 2>/dev/null || rm -rf "$build"
  fi
  echo "$dir/src/valkey-server"
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
