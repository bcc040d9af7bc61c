#!/usr/bin/env python3
"""make bench, the join table: how long a fresh device (a CI runner) takes to hold
the team's state, with the installed commands against a real `sk server`.

For each size N, a writer pushes N events over a fixed number of aggregates (the
server asks it for a snapshot on the way, as it would in use); then a fresh home
with only the URL and a key runs
  sk sync --shallow   the newest snapshot and the events after it
  sk sync             the same start, then the whole history fetched (not folded)
  sk sync, streamed   the whole log replayed, as sk 0.3.0 did (SK_SNAPSHOT_EVERY=0
                      on a second server, so no snapshot exists)
and, on the device that holds all N, `sk blame` and `sk conflicts` of one
aggregate (median of 15). Peak RSS is measured by /usr/bin/time -f %M.

    python bench/bench_join.py [--sizes 100000,300000,1000000] [--aggregates 1000]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import BIN, free_port, make_events, start_server  # noqa: E402


def timed(argv, env, stdin=None):
    """(seconds, peak RSS MiB of the command itself, stdout) via /usr/bin/time."""
    with tempfile.NamedTemporaryFile() as rss:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *map(str, argv)],
                           env=env, stdin=stdin, capture_output=True)
        secs = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"bench: {' '.join(map(str, argv))} exited {p.returncode}:"
                     f" {p.stderr.decode()}")
        kib = int(Path(rss.name).read_text().split()[-1])
    return secs, kib / 1024, p.stdout


def median_ms(argv, env, runs=15):
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(list(map(str, argv)), env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


class Server:
    def __init__(self, work, name, every):
        self.db, self.port = work / f"{name}.db", free_port()
        self.env = dict(os.environ, SK_SERVER_DB=str(self.db),
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.proc = start_server(self.env, work / f"{name}.log", "--port", self.port,
                                 "--snapshot-every", every)
        self.url, self.work, self.n = f"http://127.0.0.1:{self.port}", work, 0

    def device(self, name):
        key = subprocess.run([str(BIN / "sk-register"), "--name", name, "-q"], env=self.env,
                             capture_output=True, text=True, check=True).stdout.strip()
        env = dict(self.env, SK_HOME=str(self.work / f"{self.db.stem}-{name}"))
        env.pop("SK_SERVER_DB")
        subprocess.run([str(BIN / "sk"), "sync", "setup", "-q", "--server", self.url, "--key",
                        key], env=env, check=True)
        if getattr(self, "writer", None):   # a member shares the team key, as its next sync would
            subprocess.run([str(BIN / "sk"), "team", "members", "-q"], env=self.writer,
                           stdout=subprocess.DEVNULL, check=True)
        return env

    def stop(self):
        os.killpg(self.proc.pid, 15)
        self.proc.wait(30)


def state(env):
    return subprocess.run([str(BIN / "sk-state")], env=env, capture_output=True,
                          check=True).stdout


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,300000,1000000",
                   help="log sizes, comma-separated (default 100000,300000,1000000)")
    p.add_argument("--aggregates", type=int, default=1000, help="distinct aggregates")
    p.add_argument("--payload", type=int, default=300, help="approximate bytes per event")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="sk-bench-join-"))
    snap, stream = Server(work, "snap", 10_000), Server(work, "stream", 0)
    rows, ok = [], True
    try:
        writers = {s: s.device("writer") for s in (snap, stream)}
        for s, w in writers.items():
            s.writer = w
        for s in writers.values():
            subprocess.run([str(BIN / "sk"), "sync", "-q"], env=s, check=True)
        have = 0
        for n in sizes:
            data = work / "events.ndjson"
            make_events(data, n - have, args.payload, args.aggregates, node=f"{n}-")
            for srv, w in writers.items():
                with open(data, "rb") as f:
                    subprocess.run([str(BIN / "sk-append"), "-q"], env=w, stdin=f, check=True)
                subprocess.run([str(BIN / "sk"), "sync", "-q"], env=w, check=True)
                # the snapshot is asked for past every 10,000 events: once more at the end
                subprocess.run([str(BIN / "sk"), "sync", "-q"], env=w, check=True)
            have = n
            want = state(writers[snap])
            t_shallow, m_shallow, _ = timed([BIN / "sk", "sync", "-q", "--shallow"],
                                            ci := snap.device(f"ci-shallow-{n}"))
            ok &= state(ci) == want
            began = json.loads(subprocess.run([str(BIN / "sk"), "sync", "status", "--json"],
                                              env=ci, capture_output=True, check=True).stdout)
            t_full, m_full, _ = timed([BIN / "sk", "sync", "-q"], full := snap.device(f"ci-{n}"))
            ok &= state(full) == want
            t_stream, m_stream, _ = timed([BIN / "sk", "sync", "-q"],
                                          old := stream.device(f"ci-{n}"))
            ok &= state(old) == state(writers[stream])
            agg = "feature:F-7"
            blame = median_ms([BIN / "sk", "blame", agg], full)
            confl = median_ms([BIN / "sk", "conflicts", agg], full)
            rows.append((n, (began.get("shallow") or {}).get("seq"), t_stream, m_stream, t_full,
                         m_full, t_shallow, m_shallow, blame, confl))
            print(f"bench_join: {n:,} done", file=sys.stderr)
    finally:
        snap.stop()
        stream.stop()
    print(f"\nsk bench join: a fresh home's first sync, {args.aggregates:,} aggregates, events of"
          f" ~{args.payload} bytes, server on 127.0.0.1 (SQLite); peak RSS by /usr/bin/time\n")
    print("| events | snapshot at | streamed s | MiB | full s | MiB | --shallow s | MiB |"
          " stream / shallow | blame ms | conflicts ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, at, ts, ms, tf, mf, tsh, msh, b, c in rows:
        print(f"| {n:,} | {f'{at:,}' if at is not None else '-'} | {ts:.2f} | {ms:.0f} | {tf:.2f} |"
              f" {mf:.0f} | {tsh:.2f} | {msh:.0f} | {ts / tsh:.1f}x | {b:.0f} | {c:.0f} |")
    print("\nstreamed: no snapshot on the server (the whole log replayed, as in sk 0.3.0); full:"
          " begins at the snapshot, then fetches the history before it without folding it;"
          f" --shallow: the snapshot and the events after it. states identical: {ok}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
