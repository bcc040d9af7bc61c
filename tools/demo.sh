#!/usr/bin/env bash
# make demo: a server on a temp SQLite file, two devices, events both ways, one state.
set -euo pipefail
work=$(mktemp -d -t sk-demo-XXXXXX)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
    echo "== server stopped"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SK_SERVER_DB="$work/server.db"
say() { printf '\n== %s\n' "$*"; }

say "starting sk server on 127.0.0.1:$port (database $SK_SERVER_DB)"
sk server --port "$port" --no-control-socket >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.1
done

say "registering two devices (sk-register prints each key once)"
alice_key=$(sk-register --name alice --team demo -q)
bob_key=$(sk-register --name bob --team demo -q)
sk-register --list

say "alice: setup, append three events, sync"
export SK_HOME="$work/alice"
sk sync setup --server "http://127.0.0.1:$port" --key "$alice_key"
sk-append --type project_created --aggregate project:sk --set name=sk --set owner=alice
printf '%s\n' \
  '{"event_type":"feature_created","aggregate_type":"feature","aggregate_id":"F-1","payload":{"title":"Login","status":"draft"}}' \
  '{"event_type":"setting_changed","aggregate_type":"setting","aggregate_id":"smtp_password","payload":{"value":"hunter2"}}' \
  | sk-append
sk sync

say "bob: setup, sync (gets alice's events), change F-1, add F-2, sync"
export SK_HOME="$work/bob"
sk sync setup --server "http://127.0.0.1:$port" --key "$bob_key"
sk sync
sk-append --type feature_updated --aggregate feature:F-1 --set status=ready
sk-append --type feature_created --aggregate feature:F-2 --set title=Logout
sk sync

say "alice: sync (gets bob's changes)"
export SK_HOME="$work/alice"
sk sync

say "alice's state"
SK_HOME="$work/alice" sk-state --pretty
say "bob's state (alice's smtp_password setting never left her device)"
SK_HOME="$work/bob" sk-state --pretty

if [ "$(SK_HOME="$work/alice" sk-state feature)" = "$(SK_HOME="$work/bob" sk-state feature)" ]; then
  say "converged: alice and bob hold the same features and projects"
else
  echo "demo: states differ" >&2; exit 1
fi
say "alice's sync status"
SK_HOME="$work/alice" sk sync status --check
