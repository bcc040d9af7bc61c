#!/usr/bin/env python3
"""make bench: move N events device A -> real `sk server` -> device B with the
installed commands, and print a table of throughput and peak RSS.

    python bench/bench.py [--n 100000] [--payload 300]
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rss(argv, env, stdin=None):
    """Run a command; return (seconds, its own peak RSS in MiB, stdout bytes)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code != 0:
            sys.exit(f"bench: {' '.join(map(str, argv))} exited {code}: {err.read().decode()}")
        return secs, usage.ru_maxrss / 1024, out.read()


def make_events(path, n, payload_bytes, aggregates):
    """Write n NDJSON events to path; return them as floor.run wants them."""
    filler = "x" * max(0, payload_bytes - 220)
    rows = []
    with open(path, "w") as f:
        for i in range(n):
            ev = {"event_type": "feature_updated", "aggregate_type": "feature",
                  "aggregate_id": f"F-{i % aggregates}", "event_id": str(uuid.uuid4()),
                  "payload": {"title": f"feature {i}", "status": random.choice(["draft", "ready"]),
                              "n": i, "notes": filler}}
            f.write(json.dumps(ev) + "\n")
            rows.append((ev["event_id"], ev["event_type"], ev["aggregate_type"],
                         ev["aggregate_id"], i + 1, "node-a", json.dumps(ev["payload"]),
                         "2026-11-22T00:00:00Z"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="events to move (default 100000)")
    p.add_argument("--payload", type=int, default=300, help="approximate bytes per event")
    p.add_argument("--aggregates", type=int, default=5000, help="distinct aggregates")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sk-bench-"))
    port = free_port()
    env = dict(os.environ, SK_SERVER_DB=str(work / "server.db"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    server = subprocess.Popen([str(BIN / "sk"), "server", "--port", str(port),
                               "--no-control-socket"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "wb"), start_new_session=True)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        homes = {}
        for name in ("a", "b"):
            key = subprocess.run([str(BIN / "sk-register"), "--name", name, "-q"], env=env,
                                 capture_output=True, text=True, check=True).stdout.strip()
            homes[name] = dict(env, SK_HOME=str(work / name))
            run_rss([str(BIN / "sk"), "sync", "setup", "--server", url, "--key", key, "-q"], homes[name])
            run_rss([str(BIN / "sk"), "sync", "-q"], homes[name])  # devices start in sync
        data = work / "events.ndjson"
        floor_rows = make_events(data, args.n, args.payload, args.aggregates)
        size = data.stat().st_size / args.n
        floor_push, floor_pull = floor.run(str(work), floor_rows)
        del floor_rows
        rows = []
        with open(data, "rb") as f:
            t, rss, _ = run_rss([str(BIN / "sk-append"), "-q"], homes["a"], stdin=f)
        rows.append(("sk-append (A)", t, rss))
        t, rss, _ = run_rss([str(BIN / "sk-stamp"), "-q"], homes["a"])
        rows.append(("sk-stamp (A)", t, rss))
        t, rss, _ = run_rss([str(BIN / "sk"), "sync", "-q"], homes["a"])
        rows.append(("sk sync push (A)", t, rss))
        t, rss, _ = run_rss([str(BIN / "sk"), "sync", "-q"], homes["b"])
        rows.append(("sk sync pull+resolve (B)", t, rss))
        _, _, out = run_rss([str(BIN / "sk-state"), "feature"], homes["b"])
        got = len(json.loads(out))
        _, _, out_a = run_rss([str(BIN / "sk-state"), "feature"], homes["a"])
        same = out == out_a
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
    print(f"\nsk bench: N = {args.n:,} events of ~{size:.0f} bytes (NDJSON), "
          f"{args.aggregates:,} aggregates, server on 127.0.0.1 (SQLite)\n")
    floors = {"sk sync push (A)": floor_push, "sk sync pull+resolve (B)": floor_pull}
    print(f"| {'step':<26} | {'seconds':>8} | {'events/s':>10} | {'x floor':>7} | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 28}|{'-' * 9}:|{'-' * 11}:|{'-' * 8}:|{'-' * 13}:|")
    print(f"| {'floor: push':<26} | {floor_push:8.2f} | {args.n / floor_push:10,.0f} | {1:7.2f} | {'':>12} |")
    print(f"| {'floor: pull+resolve':<26} | {floor_pull:8.2f} | {args.n / floor_pull:10,.0f} | {1:7.2f} | {'':>12} |")
    for name, t, rss in rows:
        ratio = f"{floors[name] / t:7.2f}" if name in floors else f"{'':>7}"
        print(f"| {name:<26} | {t:8.2f} | {args.n / t:10,.0f} | {ratio} | {rss:12.1f} |")
    print(f"\nB resolved {got:,} aggregates; A and B states identical: {same}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if same and got == min(args.n, args.aggregates) else 1


if __name__ == "__main__":
    sys.exit(main())
