#!/usr/bin/env bash
# First start: a cluster in $PGDATA with the user `marketplace` (password POSTGRES_PASSWORD, or
# the file POSTGRES_PASSWORD_FILE names, e.g. a Docker secret; scram-sha-256 over the network)
# owning the database `catalogue`. Then run the server.
set -euo pipefail
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
  [ -z "${POSTGRES_PASSWORD:-}" ] || { echo "POSTGRES_PASSWORD and POSTGRES_PASSWORD_FILE are both set: keep one" >&2; exit 2; }
  POSTGRES_PASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")" \
    || { echo "POSTGRES_PASSWORD_FILE=$POSTGRES_PASSWORD_FILE cannot be read: mount the password secret there" >&2; exit 2; }
fi
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE)}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$PGDATA" -U marketplace --pwfile="$pwfile" -A scram-sha-256 -E UTF8 --locale=C.UTF-8
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=127.0.0.1" -w start
  PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -U marketplace -d postgres -c 'CREATE DATABASE catalogue'
  pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c max_connections=200
