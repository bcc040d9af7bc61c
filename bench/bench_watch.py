#!/usr/bin/env python3
"""make bench (real time): latency from sk-stamp returning on device A to the
event being committed in device B's store, with `sk sync watch` running on both,
then with 20 watchers, and the server's memory with 100 idle WebSocket sessions.

    python bench/bench_watch.py [--events 200] [--watchers 20] [--idle 100]
"""

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "lib"), str(ROOT / "server"), str(Path(__file__).parent)]
from bench import BIN, free_port, rss_mib, start_server  # noqa: E402


class Bench:
    def __init__(self, threads):
        self.work = Path(tempfile.mkdtemp(prefix="sk-bench-watch-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, SK_SERVER_DB=str(self.work / "server.db"),
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.server = start_server(self.env, self.work / "server.log", "--port", self.port,
                                   "--threads", threads)
        self.watchers = []

    def device(self, name):
        key = subprocess.run([str(BIN / "sk-register"), "--name", name, "-q"], env=self.env,
                             capture_output=True, text=True, check=True).stdout.strip()
        env = dict(self.env, SK_HOME=str(self.work / name))
        subprocess.run([str(BIN / "sk"), "sync", "setup", "-q", "--server", self.url, "--key", key],
                       env=env, check=True)
        # the first device begins the team key; a member shares it with each later one
        member = getattr(self, "member", None)
        subprocess.run([str(BIN / "sk"), *(("team", "members") if member else ("sync",)), "-q"],
                       env=member or env, stdout=subprocess.DEVNULL, check=True)
        self.member = member or env
        return env, key

    def watch(self, env):
        proc = subprocess.Popen([str(BIN / "sk"), "sync", "watch", "-q"], env=env,
                                stderr=subprocess.DEVNULL)
        self.watchers.append(proc)
        db = Path(env["SK_HOME"]) / "sk.db"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db, timeout=5) as c:
                    row = c.execute("SELECT value FROM meta WHERE key = 'watch'").fetchone()
                if row and json.loads(row[0])["state"] == "connected":
                    return proc
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        sys.exit("bench: a watcher did not connect within 30 s")

    def close(self):
        for p in self.watchers:
            p.terminate()
        for p in self.watchers:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        os.killpg(self.server.pid, 15)
        self.server.wait(30)
        shutil.rmtree(self.work, ignore_errors=True)


def latencies(a_env, b_env, n):
    """Stamp n events on A (in-process, as sk-stamp does) and time each until B has it."""
    from sk.config import Config
    from sk.event import NeverSync, check_new
    from sk.store import LocalStore
    a = LocalStore(Path(a_env["SK_HOME"]) / "sk.db")
    b = sqlite3.connect(Path(b_env["SK_HOME"]) / "sk.db", timeout=5)
    rules = NeverSync(Config(a_env["SK_HOME"]).never_sync_rules)
    out = []
    import uuid
    for i in range(n):
        eid = str(uuid.uuid4())
        a.append([check_new({"event_type": "feature_updated", "aggregate_type": "feature",
                             "aggregate_id": f"F-{i % 50}", "event_id": eid,
                             "payload": {"status": "ready", "n": i}})])
        a.stamp(rules)
        t0 = time.perf_counter()
        deadline = t0 + 10
        while not b.execute("SELECT 1 FROM events WHERE event_id = ?", (eid,)).fetchone():
            if time.perf_counter() > deadline:
                sys.exit(f"bench: event {i} did not reach B within 10 s")
            time.sleep(0.0005)
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.01)
    return out


def idle_sessions(bench, n):
    """Open n idle WebSocket sessions; return server RSS before and after (MiB)."""
    import websocket

    from sk import wire
    from sk.client import Client
    from sk.crypto import C2S
    # a device holds at most 4 real-time sessions: a device for every 4
    clients = [Client(bench.url, bench.device(f"idle{i}")[1]) for i in range((n + 3) // 4)]
    before = rss_mib(bench.server.pid)
    socks = []
    for i in range(n):
        client = clients[i // 4]
        token = client.call("ws-token", {})["token"]
        ws = websocket.create_connection(
            bench.url.replace("http", "ws", 1) + wire.WS_PATH + "?token=" + token, timeout=10)
        ws.send_binary(wire.seal_frame(client.master, client.key_id, C2S, wire.token_hash(token),
                                       {"t": "hello", "cursor": 0, "exclude_own": True, "n": 1}))
        socks.append(ws)
    for ws in socks:   # read the catch-up and "live" frames so every session is settled
        ws.settimeout(10)
        ws.recv()
    time.sleep(1.0)
    after = rss_mib(bench.server.pid)
    for ws in socks:
        ws.close()
    return before, after


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--watchers", type=int, default=20)
    p.add_argument("--idle", type=int, default=100)
    p.add_argument("--plots", default=str(Path(__file__).resolve().parent / "out"), metavar="DIR",
                   help="write the table as a PNG plot into DIR (default bench/out; none: no plot)")
    args = p.parse_args()
    bench = Bench(threads=max(32, args.watchers + args.idle + 16))
    try:
        a_env, _ = bench.device("a")
        b_env, _ = bench.device("b")
        bench.watch(a_env)
        bench.watch(b_env)
        latencies(a_env, b_env, 20)  # warm up
        two = latencies(a_env, b_env, args.events)
        for i in range(args.watchers - 2):
            bench.watch(bench.device(f"w{i}")[0])
        many = latencies(a_env, b_env, args.events)
        before, after = idle_sessions(bench, args.idle)
    finally:
        bench.close()
    print(f"\nsk bench (real time): stamp on A -> committed in B's store, {args.events} events,"
          " loopback\n")
    print(f"| {'watchers':<22} | {'median ms':>9} | {'p99 ms':>7} | {'max ms':>7} |")
    print(f"|{'-' * 24}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|")
    rows = []
    for label, vals in (("2 (A and B)", two), (f"{args.watchers} (one team)", many)):
        print(f"| {label:<22} | {statistics.median(vals):9.1f} | {pct(vals, 99):7.1f} |"
              f" {max(vals):7.1f} |")
        rows.append({"label": label, "median": statistics.median(vals), "p99": pct(vals, 99),
                     "max": max(vals)})
    print(f"\nserver RSS: {before:.1f} MiB with {2 + args.watchers - 2} watchers, {after:.1f} MiB"
          f" after {args.idle} more idle sessions ({(after - before) * 1024 / args.idle:.0f} KiB each)")
    if args.plots != "none":
        import plots
        plots.watch(rows, args.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
