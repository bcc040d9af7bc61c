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
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def rss_mib(pid):
    """Resident memory of a process and its children (the gunicorn workers)."""
    total = 0
    pids = [pid] + [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    for p in pids:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env, log, *args, bin_=BIN):
    """`sk server --no-control-socket ARGS` (ARGS naming its --port) in a session of
    its own, stderr to `log`; returns the process once the port takes connections.
    Stop it with os.killpg(proc.pid, 15)."""
    port = int(args[list(args).index("--port") + 1])
    proc = subprocess.Popen([str(bin_ / "sk"), "server", "--no-control-socket", *map(str, args)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            start_new_session=True)
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc


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


def make_events(path, n, payload_bytes, aggregates, node=""):
    """Write n NDJSON events of about payload_bytes each to path."""
    import base64
    rnd = random.Random(n)
    with open(path, "w") as f:
        for i in range(n):   # notes: text that compresses as prose does (base64, ~3/4)
            filler = base64.b64encode(rnd.randbytes(max(0, payload_bytes - 220) * 3 // 4)).decode()
            ev = {"event_type": "feature_updated", "aggregate_type": "feature",
                  "aggregate_id": f"F-{i % aggregates}",   # sk-stamp gives the event_id
                  "payload": {"title": f"feature {node}{i}",
                              "status": random.choice(["draft", "ready"]), "n": i,
                              "notes": filler}}
            f.write(json.dumps(ev) + "\n")


def median_ms(argv, env, runs=15):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def load_test(server_env, url, work, devices, events):
    """`devices` devices, each with `events` events, run `sk sync` all at once, then
    each syncs again until it holds the whole team's log. Returns a summary."""
    homes = []
    keeper = None
    for i in range(-1, devices):   # load-1 only begins the team key and shares it
        key = subprocess.run([str(BIN / "sk-register"), "--name", f"load{i}", "--team", "load",
                              "-q"], env=server_env, capture_output=True, text=True,
                             check=True).stdout.strip()
        env = dict(server_env, SK_HOME=str(work / f"load{i}"))
        subprocess.run([str(BIN / "sk"), "sync", "setup", "-q", "--server", url, "--key", key],
                       env=env, check=True)
        if i < 0:
            keeper = env
            continue
        data = work / f"load{i}.ndjson"
        make_events(data, events, 300, 1000, node=f"d{i}-")
        with open(data, "rb") as f:
            subprocess.run([str(BIN / "sk-append"), "-q"], env=env, stdin=f, check=True)
        subprocess.run([str(BIN / "sk-stamp"), "-q"], env=env, check=True)
        homes.append(env)
    subprocess.run([str(BIN / "sk"), "sync", "-q"], env=keeper, check=True)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([str(BIN / "sk"), "sync", "-q"], env=env,
                              stderr=subprocess.PIPE) for env in homes]
    errors = [p.stderr.read().decode() for p in procs if p.wait() != 0]
    for env in homes:  # those that pulled before the last pushes finished catch up
        subprocess.run([str(BIN / "sk"), "sync", "-q"], env=env, check=True)
    secs = time.perf_counter() - t0
    total = devices * events
    complete = 0
    for env in homes:
        db = sqlite3.connect(Path(env["SK_HOME"]) / "sk.db")
        n, distinct = db.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        complete += (n == distinct == total)
        db.close()
    server = sqlite3.connect(server_env["SK_SERVER_DB"])
    stored, distinct = server.execute("SELECT count(*), count(DISTINCT event_id) FROM events"
                                      " WHERE team = 'load'").fetchone()
    return {"secs": secs, "pushed": total, "moved": total * devices, "errors": errors,
            "complete": complete, "stored": stored, "distinct": distinct}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="events to move (default 100000)")
    p.add_argument("--payload", type=int, default=300, help="approximate bytes per event")
    p.add_argument("--aggregates", type=int, default=5000, help="distinct aggregates")
    p.add_argument("--load-devices", type=int, default=20, help="devices in the load test (0: skip)")
    p.add_argument("--load-events", type=int, default=2000, help="events per device in the load test")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sk-bench-"))
    port = free_port()
    env = dict(os.environ, SK_SERVER_DB=str(work / "server.db"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # no snapshots here: B replays the whole log, as the floor does (bench_join.py
    # measures a fresh device's start from a snapshot)
    server = start_server(env, work / "server.log", "--port", port, "--snapshot-every", 0)
    try:
        url = f"http://127.0.0.1:{port}"
        env["SK_SERVER_DB"] = str(work / "server.db")
        homes = {}
        for name in ("a", "b"):
            key = subprocess.run([str(BIN / "sk-register"), "--name", name, "-q"], env=env,
                                 capture_output=True, text=True, check=True).stdout.strip()
            homes[name] = dict(env, SK_HOME=str(work / name))
            run_rss([str(BIN / "sk"), "sync", "setup", "--server", url, "--key", key, "-q"], homes[name])
        for name in ("a", "b"):   # devices start in sync: a begins the team key, shares it
            run_rss([str(BIN / "sk"), "sync", "-q"], homes[name])
        data = work / "events.ndjson"
        make_events(data, args.n, args.payload, args.aggregates)
        size = data.stat().st_size / args.n
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("floor.py")),
                              str(work), str(data)], capture_output=True, text=True, check=True)
        floor_push, floor_pull = json.loads(out.stdout).values()
        rows = []
        with open(data, "rb") as f:
            t, rss, _ = run_rss([str(BIN / "sk-append"), "-q"], homes["a"], stdin=f)
        rows.append(("sk-append (A)", t, rss))
        t, rss, _ = run_rss([str(BIN / "sk-stamp"), "-q"], homes["a"])
        rows.append(("sk-stamp (A)", t, rss))
        t, rss, _ = run_rss([str(BIN / "sk-resolve"), "-q"], homes["a"])
        rows.append(("sk-resolve (A, own events)", t, rss))
        t, rss, _ = run_rss([str(BIN / "sk"), "sync", "-q"], homes["a"])
        rows.append(("sk sync push (A)", t, rss))
        t, rss, _ = run_rss([str(BIN / "sk"), "sync", "-q"], homes["b"])
        rows.append(("sk sync pull+resolve (B)", t, rss))
        _, _, out = run_rss([str(BIN / "sk-state"), "feature"], homes["b"])
        got = len(json.loads(out))
        _, _, out_a = run_rss([str(BIN / "sk-state"), "feature"], homes["a"])
        same = out == out_a
        start = {"no-op sk-stamp": median_ms([str(BIN / "sk-stamp"), "-q"], homes["a"]),
                 "sk sync status": median_ms([str(BIN / "sk"), "sync", "status"], homes["a"])}
        load = load_test(env, url, work, args.load_devices, args.load_events) \
            if args.load_devices else None
        server_rss = rss_mib(server.pid)
        with sqlite3.connect(work / "server.db") as sdb:
            stored = sdb.execute("SELECT sum(length(sealed)) FROM batches WHERE team = ?", ("default",)).fetchone()[0] or 0
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
    print(f"the server stores {stored / args.n:.0f} sealed bytes an event (gzip, then AES-GCM,"
          f" by batch) for {size:.0f} bytes of NDJSON")
    print("\nstart-up, median of 15 runs: " + ", ".join(f"{k} {v:.0f} ms" for k, v in start.items()))
    ok = same and got == min(args.n, args.aggregates)
    if load:
        print(f"\nload: {args.load_devices} devices x {args.load_events:,} events, `sk sync` all at"
              f" once then once more each: {load['secs']:.1f} s; pushed {load['pushed']:,}"
              f" ({load['pushed'] / load['secs']:,.0f}/s), delivered {load['moved']:,}"
              f" ({load['moved'] / load['secs']:,.0f}/s) into the devices' logs;"
              f" server RSS {server_rss:.0f} MiB")
        print(f"      errors: {len(load['errors'])}; server holds {load['stored']:,} events,"
              f" {load['distinct']:,} distinct; devices with the whole log exactly once:"
              f" {load['complete']}/{args.load_devices}")
        ok = ok and not load["errors"] and load["complete"] == args.load_devices \
            and load["stored"] == load["distinct"] == load["pushed"]
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
