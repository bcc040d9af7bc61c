#!/usr/bin/env python3
"""make bench, the wire table: bytes on the wire per event, both ways, through a
counting TCP proxy between the installed commands and a real `sk server`.

A writes N small events (~110 bytes of NDJSON each, 500 aggregates) and runs
`sk sync` (its push, and the pull that follows it); then B, holding nothing of
them, runs `sk sync` (its pull). Every byte each way is counted: HTTP headers,
the transport seal, manifests, sealed batches, answers.

    python bench/bench_wire.py [--n 20000] [--bin DIR]

--bin: the directory of the sk commands to measure (default: this checkout's);
another version's commands give its figures for the same events.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "tests")]
from bench import BIN, free_port, start_server  # noqa: E402
from conftest import TcpProxy  # noqa: E402


class Counter(TcpProxy):
    """The tests' loopback proxy, counting the bytes going up and down."""

    def __init__(self, upstream):
        self.up = self.down = 0
        self.lock = threading.Lock()
        super().__init__(upstream)

    def passing(self, data, upward, conn):
        with self.lock:
            if upward:
                self.up += len(data)
            else:
                self.down += len(data)
        return data

    def take(self):
        time.sleep(0.2)   # the last bytes of a closing connection
        with self.lock:
            out, self.up, self.down = (self.up, self.down), 0, 0
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="events (default 20000)")
    p.add_argument("--bin", type=Path, default=BIN, help="the sk commands to measure")
    args = p.parse_args()
    bin_ = args.bin
    work = Path(tempfile.mkdtemp(prefix="sk-bench-wire-"))
    port = free_port()
    env = dict(os.environ, SK_SERVER_DB=str(work / "server.db"),
               PATH=f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}")
    version = subprocess.run([str(bin_ / "sk"), "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    extra = []
    help_ = subprocess.run([str(bin_ / "sk"), "server", "--help"], env=env, capture_output=True,
                           text=True).stdout
    if "--snapshot-every" in help_:
        extra = ["--snapshot-every", "0"]
    if (bin_ / "sk-admin").exists() and "init" in subprocess.run(
            [str(bin_ / "sk-admin"), "--help"], env=env, capture_output=True, text=True).stdout:
        subprocess.run([str(bin_ / "sk-admin"), "init", "-q"], env=env, check=True)
    server = start_server(env, work / "server.log", "--port", port, *extra, bin_=bin_)
    try:
        proxy = Counter(port)
        homes = {}
        for name in ("a", "b"):
            key = subprocess.run([str(bin_ / "sk-register"), "--name", name, "-q"], env=env,
                                 capture_output=True, text=True, check=True).stdout.strip()
            homes[name] = h = dict(env, SK_HOME=str(work / name))
            h.pop("SK_SERVER_DB")
            subprocess.run([str(bin_ / "sk"), "sync", "setup", "-q", "--server", proxy.url,
                            "--key", key], env=h, check=True)
        for name in ("a", "b", "a"):   # the team key begun and shared, both in step
            subprocess.run([str(bin_ / "sk"), "sync", "-q"], env=homes[name], check=True)
        data = work / "events.ndjson"
        with open(data, "w") as f:
            for i in range(args.n):
                f.write(json.dumps({"event_type": "task_updated", "aggregate_type": "task",
                                    "aggregate_id": f"T-{i % 500}",
                                    "payload": {"title": f"task {i}", "done": i % 3 == 0}})
                        + "\n")
        ndjson = data.stat().st_size / args.n
        with open(data, "rb") as f:
            subprocess.run([str(bin_ / "sk-append"), "-q"], env=homes["a"], stdin=f, check=True)
        proxy.take()
        subprocess.run([str(bin_ / "sk"), "sync", "-q"], env=homes["a"], check=True)
        a_up, a_down = proxy.take()
        subprocess.run([str(bin_ / "sk"), "sync", "-q"], env=homes["b"], check=True)
        b_up, b_down = proxy.take()
        same = (subprocess.run([str(bin_ / "sk-state"), "task"], env=homes["a"],
                               capture_output=True, check=True).stdout
                == subprocess.run([str(bin_ / "sk-state"), "task"], env=homes["b"],
                                  capture_output=True, check=True).stdout)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
    n = args.n
    print(f"\nsk bench wire: {version}, N = {n:,} events of ~{ndjson:.0f} bytes (NDJSON),"
          " 500 aggregates; bytes through a counting proxy\n")
    print("| run | up B/event | down B/event |")
    print("|---|---:|---:|")
    print(f"| A: sk sync (push) | {a_up / n:.1f} | {a_down / n:.1f} |")
    print(f"| B: sk sync (pull) | {b_up / n:.1f} | {b_down / n:.1f} |")
    print(f"\nA and B states identical: {same}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
