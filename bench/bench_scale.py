#!/usr/bin/env python3
"""Scale-out benchmark: push and pull+resolve events/s with 1 sk server on SQLite
and with 1, 2 and 4 sk servers (--workers 1 each, behind a round-robin TCP
balancer when more than one) on one durable PostgreSQL, with all devices at once;
p50/p99 latency of /api/push and /api/pull from the servers' access logs; and the
CPU seconds spent by the sk servers, PostgreSQL and the clients in each phase.

For each configuration: a fresh database; D devices of one team, each holding E
stamped events (~300 bytes, 1000 shared aggregates, as in bench.py's load test);
phase 1, every device runs `sk-push-batch --all` at once (push events/s = D x E /
wall time); phase 2, every device runs `sk-pull` then `sk-resolve`, all at once
(pull+resolve events/s = D x (D x E - E) events delivered / wall time). Then it
checks that the server holds D x E distinct events, that every device's log holds
all of them once with nothing queued, unapplied or rejected, and that every
device resolved the same state.

    python bench/bench_scale.py [--devices 20] [--events 2000]
                                [--configs sqlite,pg1,pg2,pg4] [--quick]
"""

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))
from bench import free_port, make_events  # noqa: E402

CONFIGS = {  # name: (label, database kind, servers)
    "sqlite": ("SQLite", "sqlite", 1),
    "pg1": ("PostgreSQL", "pg", 1),
    "pg2": ("PostgreSQL", "pg", 2),
    "pg4": ("PostgreSQL", "pg", 4),
}
TEAM = "scale"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# common log format, then microseconds: ... "POST /api/push HTTP/1.1" 200 1234 2746
ACCESS = re.compile(r'"(\S+) (\S+) [^"]*" (\d{3}) \S+ (\d+)\s*$')

ROLES = ("servers", "postgres", "clients", "balancer")
LIVE = []   # every process this script started and has not yet reaped, for cleanup


T0 = time.perf_counter()


def say(*a):
    print(f"[{time.perf_counter() - T0:5.1f} s]", *a, file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------

def spawn(argv, env, **kw):
    p = subprocess.Popen([str(a) for a in argv], env=env, **kw)
    p.own_group = bool(kw.get("start_new_session"))   # leads a process group of its own
    LIVE.append(p)
    return p


def reap(p, timeout=None):
    code = p.wait(timeout)
    if p in LIVE:
        LIVE.remove(p)
    return code


def kill(p):
    """Stop one process we started, by its id (with the process group it leads, if it
    was started in a session of its own: a server's gunicorn workers)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM) if p.own_group else p.terminate()
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL) if p.own_group else p.kill()
            p.wait()
        except ProcessLookupError:
            pass
    if p in LIVE:
        LIVE.remove(p)


def run_many(jobs, timeout=120):
    """Run (argv, env) jobs all at once; return their stdouts, or raise with the first
    failure's stderr."""
    started = []
    try:
        for argv, env in jobs:
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            started.append((argv, spawn(argv, env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err), out, err))
        outs = []
        for argv, proc, out, err in started:
            try:
                reap(proc, timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{' '.join(map(str, argv))} still running after {timeout} s")
            out.seek(0)
            err.seek(0)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}:"
                                   f" {err.read().decode(errors='replace').strip()}")
            outs.append(out.read())
        return outs
    finally:
        for _, proc, out, err in started:
            kill(proc)
            out.close()
            err.close()


def run_all(plans, envs, timeout, stdin=None, cpu=None):
    """Device i (environment envs[i]) runs the commands of plans[i] in order, stdin[i]
    (a path) feeding the first; all devices at once. Returns (wall seconds, [error
    text]). A command that fails ends its device's run; one still running at the
    deadline is killed. cpu, a dict, gets the CPU seconds of each command by name."""
    t0 = time.perf_counter()
    errors, running = [], {}
    try:
        for i, env in enumerate(envs):
            running[i] = (0, _start(plans[i][0], env, stdin and stdin[i]))
        while running:
            time.sleep(0.005)
            late = time.perf_counter() - t0 > timeout
            for i, (k, (p, err)) in list(running.items()):
                name = Path(plans[i][k][0]).name
                if not _exited(p, cpu, name):
                    if not late:
                        continue
                    kill(p)
                    err.close()
                    errors.append(f"device {i}: {name} still running after {timeout:.0f} s: killed")
                    del running[i]
                    continue
                reap(p)
                err.seek(0)
                text = err.read().decode(errors="replace").strip()
                err.close()
                if p.returncode:
                    errors.append(f"device {i}: {name} exited {p.returncode}: {text}")
                    del running[i]
                elif k + 1 < len(plans[i]):
                    running[i] = (k + 1, _start(plans[i][k + 1], envs[i], None))
                else:
                    del running[i]
    finally:
        for _, (p, err) in running.values():
            kill(p)
            err.close()
    return time.perf_counter() - t0, errors


def _exited(p, cpu, name):
    """Whether p has exited (reaping it, as Popen.poll does, but with its rusage)."""
    if p.returncode is not None:
        return True
    pid, status, usage = os.wait4(p.pid, os.WNOHANG)
    if pid == 0:
        return False
    p.returncode = os.waitstatus_to_exitcode(status)
    if cpu is not None:
        cpu[name] = cpu.get(name, 0.0) + usage.ru_utime + usage.ru_stime
    return True


def same(steps, n):
    """The same plan for n devices."""
    return [steps] * n


def _start(argv, env, stdin_path):
    err = tempfile.TemporaryFile()
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    try:
        return spawn(argv, env, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err), err
    finally:
        if stdin_path:
            stdin.close()


# -- CPU accounting --------------------------------------------------------------

def _tree(pid):
    """pid and its descendants (all threads' children), those still there."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_cpu(pids):
    """CPU seconds used so far by these processes and all their descendants: the sum of
    utime+stime+cutime+cstime over the live ones (children that exited and were waited
    for are in their parent's cutime/cstime, e.g. PostgreSQL backends)."""
    ticks = 0
    for root in pids:
        for p in _tree(root):
            try:
                with open(f"/proc/{p}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            fields = s[s.rindex(")") + 2:].split()
            ticks += sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
    return ticks / CLK_TCK


def machine_cpu():
    """(busy, idle) CPU seconds of the whole machine so far, from /proc/stat: busy is
    user+nice+system+irq+softirq+steal, idle is idle+iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK, (v[3] + v[4]) / CLK_TCK


def _rusage(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU seconds by role between start() and stop(): the sk servers (master and
    worker processes), PostgreSQL (postmaster, backends, background processes), the
    clients (the device commands: our reaped children) and this process (the
    balancer's threads and the bench's own polling)."""

    def __init__(self, server_pids, pg_pid):
        self.server_pids, self.pg_pid = server_pids, pg_pid

    def _sample(self):
        busy, idle = machine_cpu()
        return {"servers": tree_cpu(self.server_pids),
                "postgres": tree_cpu([self.pg_pid]) if self.pg_pid else 0.0,
                "clients": _rusage(resource.RUSAGE_CHILDREN),
                "balancer": _rusage(resource.RUSAGE_SELF),
                "machine": busy, "idle": idle}

    def start(self):
        self._before = self._sample()

    def stop(self):
        """CPU seconds since start() by role; "other" is the machine's busy time that none
        of ours account for (other programs), "idle" includes iowait."""
        after = self._sample()
        d = {k: after[k] - self._before[k] for k in after}
        mine = sum(d[k] for k in ROLES)
        d["other"] = max(0.0, d.pop("machine") - mine)
        return d


# -- servers ---------------------------------------------------------------------

def start_servers(servers, n, db, env, logdir, meanwhile=None):
    """Start n servers on db, appending (Popen, port, log path) to servers as each
    starts (so the caller can stop them whatever happens); call meanwhile() while they
    boot; return once each answers /healthz."""
    for i in range(n):
        port = free_port()
        log = open(logdir / f"server{i}.log", "wb")
        p = spawn([BIN / "sk", "server", "--host", "127.0.0.1", "--port", port, "--db", db,
                   "--workers", "1", "--no-control-socket", "--access-log"],
                  env, stdout=log, stderr=log,   # gunicorn writes the access log to stdout
                  start_new_session=True)
        log.close()
        servers.append((p, port, logdir / f"server{i}.log"))
    if meanwhile:
        meanwhile()
    deadline = time.monotonic() + 60
    for p, port, log in servers:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"sk server exited {p.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sk server on port {port} not ready after 60 s")
            time.sleep(0.05)


def latencies(logs):
    """{endpoint: [ms]} and the count of non-2xx answers, from the access logs."""
    got, bad = {"push": [], "pull": []}, []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = ACCESS.search(line)
            if not m:
                continue
            method, path, status, micros = m.groups()
            if not status.startswith("2"):
                bad.append(f"{status} {method} {path}")
            for name in got:
                if path.split("?")[0] == f"/api/{name}":
                    got[name].append(int(micros) / 1000)
    return got, bad


def pct(values, q):
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[max(0, min(len(v) - 1, -(-len(v) * q // 100) - 1))]


# -- one configuration -----------------------------------------------------------

def run_config(name, args, work, templates, pg, base_env):
    label, kind, nservers = CONFIGS[name]
    cdir = work / name
    cdir.mkdir()
    env = {k: v for k, v in base_env.items()
           if k not in ("SK_SERVER_DB", "SK_SERVER_SECRET", "SK_SERVER_SECRET_FILE",
                        "SK_SERVER", "SK_API_KEY", "SK_HOME")}
    if kind == "pg":
        dbname = f"scale_{name}"
        pg.drop_database(dbname)
        db = pg.create_database(dbname)
        env["SK_SERVER_SECRET_FILE"] = str(cdir / "server.secret")
    else:
        db = str(cdir / "server.db")   # sk-register opens only a database that exists
        subprocess.run([str(BIN / "sk-admin"), "--db", db, "init"], env=env, check=True,
                       capture_output=True)
    say(f"[{name}] registering {args.devices} devices, starting {nservers} server(s)")
    register = [([BIN / "sk-register", "--db", db, "--name", f"dev{i}", "--team", TEAM, "-q"], env)
                for i in range(args.devices)]
    # the first alone: it creates the schema and the server secret the others then use;
    # the rest while the servers start
    keys = run_many(register[:1])
    servers, balancer = [], None
    result = {"name": name, "label": label, "servers": nservers, "errors": []}
    try:
        start_servers(servers, nservers, db, env, cdir,
                      lambda: keys.extend(run_many(register[1:])))
        keys = [k.decode().strip() for k in keys]
        if nservers > 1:
            from balancer import Balancer
            balancer = Balancer([("127.0.0.1", port) for _, port, _ in servers]).start()
            url = balancer.url
        else:
            url = f"http://127.0.0.1:{servers[0][1]}"
        homes = []
        for i, tpl in enumerate(templates):
            home = cdir / f"dev{i}"
            shutil.copytree(tpl, home)
            homes.append(dict(env, SK_HOME=str(home)))
        _, errors = run_all([[[BIN / "sk", "sync", "setup", "-q", "--server", url, "--key", k]]
                             for k in keys], homes, 60)
        if errors:
            raise RuntimeError("sk sync setup failed: " + "; ".join(errors))

        say(f"[{name}] {nservers} server(s) up, {args.devices} devices set up")
        meter = CpuMeter([p.pid for p, _, _ in servers], pg._proc.pid if kind == "pg" else None)
        total = args.devices * args.events
        say(f"[{name}] phase 1: {args.devices} x sk-push-batch --all ({total:,} events)")
        meter.start()
        by_cmd = {}
        secs, errors = run_all(same([[BIN / "sk-push-batch", "--all", "-q"]], len(homes)), homes,
                               args.timeout, cpu=by_cmd)
        result["push"] = {"secs": secs, "events": total, "cpu": meter.stop(), "by_cmd": by_cmd}
        result["errors"] += errors
        delivered = args.devices * (total - args.events)
        say(f"[{name}] phase 2: {args.devices} x sk-pull, sk-resolve ({delivered:,} events delivered)")
        meter.start()
        by_cmd = {}
        secs, errors = run_all(same([[BIN / "sk-pull", "-q"], [BIN / "sk-resolve", "-q"]],
                                    len(homes)), homes, args.timeout, cpu=by_cmd)
        result["pull"] = {"secs": secs, "events": delivered, "cpu": meter.stop(), "by_cmd": by_cmd}
        result["errors"] += errors
        say(f"[{name}] checking")
        result["errors"] += verify(db, kind, homes, total)
        if balancer:
            result["connections"] = list(balancer.connections)
    finally:
        if balancer:
            balancer.stop()
        for p, _, _ in servers:
            kill(p)
    lat, bad = latencies([log for _, _, log in servers])
    result["latency"] = lat
    result["http_errors"] = bad
    if kind == "pg":
        pg.drop_database(dbname)
    shutil.rmtree(cdir, ignore_errors=True)
    return result


def verify(db, kind, homes, total):
    """Problems found after the run: server count, each device's log, queue and state."""
    problems = []
    sql = "SELECT count(*), count(DISTINCT event_id) FROM events WHERE team = "
    if kind == "pg":
        import psycopg
        with psycopg.connect(db) as conn:
            stored, distinct = conn.execute(sql + "%s", (TEAM,)).fetchone()
    else:
        conn = sqlite3.connect(db)
        stored, distinct = conn.execute(sql + "?", (TEAM,)).fetchone()
        conn.close()
    if not stored == distinct == total:
        problems.append(f"server holds {stored:,} events ({distinct:,} distinct), not {total:,}")
    outs = run_many([([BIN / "sk", "sync", "status", "--json"], env) for env in homes]
                    + [([BIN / "sk-state"], env) for env in homes])
    statuses = outs[:len(homes)]
    states = {hashlib.sha256(out).hexdigest() for out in outs[len(homes):]}
    for i, (env, status) in enumerate(zip(homes, statuses)):
        conn = sqlite3.connect(Path(env["SK_HOME"]) / "sk.db")
        n, distinct = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        conn.close()
        if not n == distinct == total:
            problems.append(f"device {i}: log holds {n:,} events ({distinct:,} distinct), not {total:,}")
        info = json.loads(status)
        left = {k: info[k] for k in ("queued", "rejected", "unstamped", "unapplied") if info[k]}
        if left:
            problems.append(f"device {i}: left over {left}")
    if len(states) != 1:
        problems.append(f"devices resolved {len(states)} different states")
    return problems


# -- report ----------------------------------------------------------------------

def report(results, args, cores, elapsed):
    ok = _report(results, args, cores, elapsed)
    if args.plots != "none":
        import plots
        plots.scale(plot_rows(results), args.plots)
    return ok


def plot_rows(results):
    """The throughput table's rows, for bench/plots.py."""
    return [{"label": r["label"], "servers": r["servers"],
             "push": r["push"]["events"] / r["push"]["secs"],
             "pull": r["pull"]["events"] / r["pull"]["secs"]} for r in results if "pull" in r]


def _report(results, args, cores, elapsed):
    print(f"\nsk bench_scale: {args.devices} devices of one team at once, {args.events:,} events"
          f" of ~300 bytes each ({args.devices * args.events:,} in all), {cores} CPU cores,"
          f" loopback; PostgreSQL with fsync on, SQLite synchronous=FULL\n")
    print("| config | servers | push ev/s | pull+resolve ev/s | push p50/p99 ms |"
          " pull p50/p99 ms | errors |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in results:
        if "pull" not in r:
            continue
        lat = r["latency"]
        errs = len(r["errors"]) + len(r["http_errors"])
        print(f"| {r['label']} | {r['servers']} | {r['push']['events'] / r['push']['secs']:,.0f}"
              f" | {r['pull']['events'] / r['pull']['secs']:,.0f}"
              f" | {pct(lat['push'], 50):.0f} / {pct(lat['push'], 99):.0f}"
              f" | {pct(lat['pull'], 50):.0f} / {pct(lat['pull'], 99):.0f} | {errs} |")
    print(f"\nCPU seconds by role in each phase, and % of the machine's CPU time in it"
          f" (wall x {cores} cores, from /proc/stat); \"other\" is CPU used by programs"
          " outside this benchmark, \"idle\" includes iowait:\n")
    print("| config | phase | wall s | sk servers | PostgreSQL | clients | balancer+bench |"
          " other | idle |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        for phase, title in (("push", "push"), ("pull", "pull+resolve")):
            if phase not in r:
                continue
            cpu, secs = r[phase]["cpu"], r[phase]["secs"]
            capacity = sum(cpu[k] for k in ROLES) + cpu["other"] + cpu["idle"] or 1e-9
            cells = " | ".join(f"{cpu[k]:.1f} ({100 * cpu[k] / capacity:.0f}%)"
                               for k in ROLES + ("other", "idle"))
            print(f"| {r['label']} x{r['servers']} | {title} | {secs:.2f} | {cells} |")
    print("\nclient CPU seconds by command: " + "; ".join(
        f"{r['label']} x{r['servers']}: " + ", ".join(
            f"{k} {v:.1f}" for ph in ("push", "pull") for k, v in r[ph]["by_cmd"].items())
        for r in results if "pull" in r))
    for r in results:
        if r.get("connections"):
            print(f"\n{r['label']} x{r['servers']}: balancer connections per server"
                  f" {r['connections']}", end="")
    print()
    n_req = [(r["label"], r["servers"], len(r["latency"]["push"]), len(r["latency"]["pull"]))
             for r in results if "latency" in r]
    print("requests logged (push, pull): " + ", ".join(f"{l} x{s}: {a}, {b}" for l, s, a, b in n_req))
    ok = True
    for r in results:
        if r["errors"] or r["http_errors"] or "pull" not in r:
            ok = False
            print(f"\n{r['label']} x{r['servers']}: errors")
            for e in r["errors"][:20]:
                print(f"  {e}")
            for e in r["http_errors"][:20]:
                print(f"  HTTP {e}")
    print(f"\nall checks passed: {ok} (servers hold every event once; every device holds the"
          f" whole log, nothing queued/unapplied/rejected, the same state); {elapsed:.0f} s in all")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, help="devices at once (default 20; --quick 5)")
    p.add_argument("--events", type=int, help="events per device (default 2000; --quick 200)")
    p.add_argument("--configs", default="sqlite,pg1,pg2,pg4",
                   help="comma-separated subset of " + ",".join(CONFIGS) + " (default: all)")
    p.add_argument("--timeout", type=float, default=240,
                   help="seconds a phase may take before its commands are killed (default 240)")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--plots", default=str(Path(__file__).resolve().parent / "out"), metavar="DIR",
                   help="write the table as a PNG plot into DIR (default bench/out; none: no plot)")
    args = p.parse_args()
    args.devices = args.devices or (5 if args.quick else 20)
    args.events = args.events or (200 if args.quick else 2000)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        p.error(f"unknown config {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    if args.devices < 2 or args.events < 1:
        p.error("need --devices >= 2 and --events >= 1")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    # SIGINT too: a background job starts with it ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    t_start = time.perf_counter()
    cores = os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="sk-bench-scale-"))
    base_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    pg, results = None, []
    try:
        if any(CONFIGS[c][1] == "pg" for c in configs):
            from pgcluster import PgCluster
            say("starting PostgreSQL (fsync on)")
            pg = PgCluster(fsync=True).start()
        say(f"preparing {args.devices} devices x {args.events:,} stamped events")
        templates, data = [], []
        for i in range(args.devices):
            templates.append(work / "template" / f"dev{i}")
            templates[-1].mkdir(parents=True)
            data.append(work / "template" / f"dev{i}.ndjson")
            make_events(data[-1], args.events, 300, 1000, node=f"d{i}-")
        envs = [dict(base_env, SK_HOME=str(t)) for t in templates]
        for k in ("SK_SERVER", "SK_API_KEY"):
            for e in envs:
                e.pop(k, None)
        _, errors = run_all(same([[BIN / "sk-append", "-q"], [BIN / "sk-stamp", "-q"]], len(envs)),
                            envs, 300, stdin=data)
        if errors:
            raise RuntimeError("preparing devices failed: " + "; ".join(errors))
        for name in configs:
            try:
                results.append(run_config(name, args, work, templates, pg, base_env))
            except (RuntimeError, OSError) as e:   # report it, go on with the next one
                label, _, n = CONFIGS[name]
                results.append({"name": name, "label": label, "servers": n,
                                "errors": [str(e)], "http_errors": []})
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        return 130
    except (RuntimeError, OSError) as e:
        say(f"bench_scale: {e}")
        return 1
    finally:
        for proc in list(LIVE):
            kill(proc)
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report(results, args, cores, time.perf_counter() - t_start) else 1


if __name__ == "__main__":
    sys.exit(main())
