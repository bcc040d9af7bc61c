"""What an admin sees of a running server, never content: Prometheus metrics
(`sk server --metrics HOST:PORT`) and one log line per request
(`--log-format json`).

Metrics come from two places, so that they are right across every worker
process and every server on one PostgreSQL:
- what happens in a worker (events pushed, pulled and rejected, request
  durations, failed authentications, open WebSocket sessions) is counted by
  prometheus-client in multiprocess mode: each worker writes its own files in
  PROMETHEUS_MULTIPROC_DIR (a private directory `sk server` makes and removes),
  and the listener in gunicorn's master process adds them up at scrape time;
- what the database knows (each team's head and snapshots, each device's last
  seen, lag and queue) is read from the store at scrape time (StoreCollector),
  the same figures `sk-admin status` prints (Store.status), so every server on
  one database exports the same.
Labels are teams, devices, endpoints (route names, never paths), statuses and
reason codes: bounded sets, never event ids. Memory and files stay bounded
however long nobody scrapes.

prometheus_client is imported only when metrics are on; with them off, every
function here is a no-op.
"""

import json
import re
import secrets
import sys
import threading
import time

# every metric family `sk server --metrics` exports (counters without _total)
EXPORTED = ("sk_events_pushed", "sk_events_pulled", "sk_events_rejected",
            "sk_request_duration_seconds", "sk_auth_failures", "sk_ws_sessions",
            "sk_database_up", "sk_team_head_seq", "sk_snapshots",
            "sk_device_last_seen_timestamp_seconds", "sk_device_lag_events",
            "sk_device_queue_events")

_metrics = None          # this process's metrics, when they are on
_log = None              # where request lines go, with --log-format json
_log_lock = threading.Lock()

# reasons a pushed event is refused, as label values (the store's reasons are prose)
REJECT_CODES = (("lamport_clock jumps", "lamport_jump"), ("event_id already used", "id_reused"))
AUTH_CODES = ("unknown_key", "bad_key", "replay", "stale", "revoked", "rotated", "slow_down",
              "protocol_version")
NOT_TIMED = ("ws.session",)   # a WebSocket session lasts as long as the watcher: no latency
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Metrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram
        self.pushed = Counter("sk_events_pushed", "events stored from devices' pushes",
                              ["team"])
        self.pulled = Counter("sk_events_pulled", "events sent to devices (pull pages and"
                                                  " WebSocket frames)", ["team"])
        self.rejected = Counter("sk_events_rejected", "pushed events refused, by reason",
                                ["team", "reason"])
        self.duration = Histogram("sk_request_duration_seconds", "time to answer a request,"
                                  " by route and HTTP status", ["endpoint", "status"],
                                  buckets=BUCKETS)
        self.auth = Counter("sk_auth_failures", "requests refused before or at"
                                                " authentication, by reason", ["reason"])
        self.sessions = Gauge("sk_ws_sessions", "open WebSocket sessions (sk sync watch)",
                              ["team"], multiprocess_mode="livesum")


def enable():
    """Turn this process's metrics on (PROMETHEUS_MULTIPROC_DIR must be set first)."""
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()


def pushed(team, results, refused=None, n=0):
    """A push's outcome: per-event (status, reason), or `refused` (a code) for a
    whole batch of n events that was stored not at all."""
    if _metrics is None:
        return
    if refused:
        _metrics.rejected.labels(team, refused).inc(n)
        return
    accepted = sum(1 for status, _ in results if status == "accepted")
    if accepted:
        _metrics.pushed.labels(team).inc(accepted)
    for status, reason in results:
        if status == "rejected":
            code = next((c for start, c in REJECT_CODES if (reason or "").startswith(start)),
                        "other")
            _metrics.rejected.labels(team, code).inc()


def pulled(team, page):
    """Events a page (store Page) sends: those with a body (not the puller's own)."""
    if _metrics is None:
        return
    n = sum(1 for r in page.rows if r[2] is not None or r[0] in page.legacy)
    if n:
        _metrics.pulled.labels(team).inc(n)


def auth_failure(code):
    if _metrics is not None and code in AUTH_CODES + ("ws_token",):
        _metrics.auth.labels(code).inc()


def session(team, delta):
    if _metrics is not None:
        _metrics.sessions.labels(team).inc(delta)


# -- request lines and durations -------------------------------------------------
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def init_app(app):
    """Time every request (metrics) and log it as one JSON line (LOG_FORMAT json)."""
    global _log
    if app.config.get("METRICS"):
        enable()
    if app.config.get("LOG_FORMAT") == "json":
        _log = sys.stdout
    if _metrics is None and _log is None:
        return
    from flask import g, request

    @app.before_request
    def _start():
        g.sk_t0 = time.perf_counter()
        sent = request.headers.get("X-Request-Id", "")
        g.sk_rid = sent if _REQUEST_ID.fullmatch(sent) else secrets.token_hex(8)

    @app.after_request
    def _done(resp):
        t0 = g.get("sk_t0")
        if t0 is None:
            return resp
        took = time.perf_counter() - t0
        rule = request.url_rule
        endpoint = rule.endpoint if rule is not None else "unknown"
        if _metrics is not None and endpoint not in NOT_TIMED:
            _metrics.duration.labels(endpoint, str(resp.status_code)).observe(took)
        resp.headers["X-Request-Id"] = g.sk_rid
        if _log is not None:
            line(g.sk_rid, endpoint, resp.status_code, took, _who(g))
        return resp


def _who(g):
    """The (team, device) a request authenticated as, or (None, None)."""
    seal = g.get("sk_seal")
    key = seal[0] if seal else None
    ws = g.get("sk_ws")
    if key is None and ws is not None and not isinstance(ws, str):
        key = ws[0]
    return (key.team, key.device) if key is not None else (None, None)


def line(request_id, endpoint, status, took, who):
    """One request as a JSON line: never a body, key, token or query string."""
    from flask import request
    from .store.base import utc_now
    team, device = who
    text = json.dumps({"time": utc_now(), "request_id": request_id, "method": request.method,
                       "endpoint": endpoint, "path": request.path[:200],
                       "status": status, "duration_ms": round(took * 1000, 3),
                       "team": team, "device": device,
                       "remote": request.remote_addr}, separators=(",", ":"))
    with _log_lock:
        _log.write(text + "\n")
        _log.flush()


# -- the scrape side (gunicorn's master process) ---------------------------------
class StoreCollector:
    """Gauges read from the database at scrape time (Store.status): the same on
    every server of one database, right whichever process stored what.
    sk_database_up says whether the database answered the scrape."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        up = GaugeMetricFamily("sk_database_up", "1 if the database answered this scrape")
        try:
            try:
                self.store.ping(quick=True)   # a database that is down: say so within ~2 s
                status = self.store.status(events=False)
            finally:
                # no connection is kept in the master between scrapes (nor given to the
                # workers it forks)
                self.store.close()
        except Exception:   # StoreUnavailable, a psycopg error: the scrape still answers
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        head = GaugeMetricFamily("sk_team_head_seq", "the sequence number of the team's"
                                 " newest event", labels=["team"])
        snaps = GaugeMetricFamily("sk_snapshots", "snapshots the server keeps for the team",
                                  labels=["team"])
        for t in status["teams"]:
            head.add_metric([t["team"]], t["head"])
            snaps.add_metric([t["team"]], t["snapshots"])
        seen = GaugeMetricFamily("sk_device_last_seen_timestamp_seconds", "when the device"
                                 " last made a request that authenticated (Unix time)",
                                 labels=["team", "device"])
        lag = GaugeMetricFamily("sk_device_lag_events", "events of the team's log past the"
                                " point the device's last pull reached", labels=["team", "device"])
        queue = GaugeMetricFamily("sk_device_queue_events", "events the device last said it"
                                  " had queued to push", labels=["team", "device"])
        for d in status["devices"]:
            if d["revoked"]:   # a revoked device never catches up: not a figure to watch
                continue
            labels = [d["team"], d["device"]]
            if d["last_seen"]:
                seen.add_metric(labels, _epoch(d["last_seen"]))
            lag.add_metric(labels, d["lag"])
            if d["queued"] is not None:
                queue.add_metric(labels, d["queued"])
        yield from (head, snaps, seen, lag, queue)


def _epoch(text):
    from datetime import datetime
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def registry(store):
    """The registry a scrape reads: every worker's files, and the database."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    reg = CollectorRegistry()
    MultiProcessCollector(reg)
    reg.register(StoreCollector(store))
    return reg


class MetricsListener:
    """GET /metrics on a socket of its own (bound before anything else starts),
    served by a thread of gunicorn's master process; anything else is a 404."""

    def __init__(self, sock, store):
        self.sock, self.store = sock, store
        self.httpd = None

    def start(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        reg = registry(self.store)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    body, status, ctype = b"not found: metrics are at /metrics\n", 404, \
                        "text/plain; charset=utf-8"
                else:
                    body, status, ctype = generate_latest(reg), 200, CONTENT_TYPE_LATEST
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.sock.listen(64)
        httpd = ThreadingHTTPServer(self.sock.getsockname()[:2], Handler,
                                    bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = self.sock
        httpd.daemon_threads = True
        self.httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="sk-metrics", daemon=True).start()

    def forget(self):
        """In a worker just forked: its copy of the listening socket is not its own."""
        self.sock.close()
