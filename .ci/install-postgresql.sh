#!/usr/bin/env bash
# Install what tests/test_postgres_study.py needs to run the study on a real PostgreSQL server:
# Debian's postgresql (15 on Debian 12; the server binaries, initdb and pg_ctl, land in
# /usr/lib/postgresql/<version>/bin). Idempotent: an installed server is not installed again.
# Needs root on Debian/Ubuntu (CI: fresh Debian 12). The server itself is started by the pytest
# fixture (tests/postgres_server.py) in a temporary folder on 127.0.0.1, not here; the driver comes
# with pip install -e ".[postgres]".
set -euo pipefail

find_bin() {
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

bin=$(find_bin)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-postgresql.sh: needs root to apt-get install postgresql" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: the recommends (sysstat, locales-all) are not needed for tests.
    apt-get install -y -qq --no-install-recommends postgresql
    bin=$(find_bin)
fi
# Debian's package starts a cluster of its own on port 5432; the tests never use it.
echo "install-postgresql.sh: $("$bin/postgres" --version), binaries in $bin"
