"""The REST API: /api/hello, /api/push, /api/pull, all sealed (see sk.wire)."""

import secrets
import time

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from sk import PROTOCOL_VERSION, crypto, sealed, wire
from sk.event import dumps

from . import ops
from .store import UNREADABLE, Batch, Damaged, StoreError, StoreUnavailable

api = Blueprint("api", __name__)
KEY_ID_LEN = 16
AUTH_FAIL_WINDOW_MS = 60_000


class Refused(Exception):
    def __init__(self, status, code, message, retry_after=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after


def _store():
    return current_app.extensions["sk_store"]


def error(status, code, message):
    resp = jsonify({"error": {"code": code, "message": message},
                    "protocol": PROTOCOL_VERSION})
    resp.status_code = status
    return resp


@api.errorhandler(Refused)
def _refused(e):
    """An error answer; sealed for the request when it authenticated (or when its
    seal failed under a registered key: the device that holds the key learns that
    its request was altered on the way), so that only a sealed answer can make a
    device change anything."""
    sealing = g.get("sk_seal")
    if sealing is not None:
        key, endpoint, nonce = sealing
        resp = _sealed(key, endpoint, nonce, {"error": {"code": e.code, "message": e.message},
                                              "protocol": PROTOCOL_VERSION})
        resp.status_code = e.status
    else:
        resp = error(e.status, e.code, e.message)
    if e.retry_after:
        resp.headers["Retry-After"] = str(e.retry_after)
    if e.code in ("malformed_body", "too_slow"):   # what is left on the socket is no request
        resp.headers["Connection"] = "close"
    return resp


@api.app_errorhandler(StoreError)
def _store_error(e):
    if isinstance(e, Damaged):   # said to the device, sealed: it stops there (exit 5)
        current_app.logger.error("%s %s: %s", request.path, _who(), e, exc_info=e)
        return _refused(Refused(500, "damaged", str(e)))
    if isinstance(e, StoreUnavailable):   # the client waits and retries (exit 3)
        current_app.logger.error("database %s", e)
        _store().reset()
        resp = error(503, "unavailable", "the server's database is unavailable; try again later")
        resp.headers["Retry-After"] = "5"
        return resp
    current_app.logger.error("store: %s", e)
    return error(500, "server_misconfigured", f"server misconfigured: {e}")


@api.app_errorhandler(HTTPException)
def _http_error(e):
    if e.code == 413:
        return error(413, "too_large", f"request body over {wire.MAX_BODY} bytes")
    if e.code == 404:   # one short line, not werkzeug's paragraph
        return error(404, "not_found", f"no sk endpoint at '{request.path[:100]}'")
    return error(e.code, e.name.lower().replace(" ", "_"), e.description or e.name)


@api.app_errorhandler(Exception)
def _internal(e):
    current_app.logger.exception("internal error")
    return error(500, "internal", "internal server error; see the server log")


def _who():
    """The device whose request this is, for the log ('?' before it authenticated)."""
    sealing = g.get("sk_seal")
    return f"of '{sealing[0].device}'" if sealing else "(unauthenticated)"


def _authenticate(endpoint, admit=True):
    """Check protocol, key, seal and nonce; return (key record, request nonce, body
    object) (and the request's admission ticket with admit=False). A request that
    authenticates is never refused for what others did; what fails is counted per
    address in the store (so every server process sees it), and past
    AUTH_FAIL_LIMIT a minute what fails from there is answered 429."""
    try:
        return _check_request(endpoint, admit)
    except Refused as e:
        if e.code in COUNTED:
            limit = current_app.config["AUTH_FAIL_LIMIT"]
            addr = request.remote_addr or "?"
            store = _store()
            if limit and store.auth_failures(addr, AUTH_FAIL_WINDOW_MS) >= limit:
                ops.auth_failure("slow_down")
                raise Refused(429, "slow_down", f"too many failed authentications from {addr};"
                                                " wait a minute", retry_after=60) from None
            if limit:
                store.note_auth_failure(addr, AUTH_FAIL_WINDOW_MS)
        ops.auth_failure(e.code)
        raise


COUNTED = ("unknown_key", "bad_key", "replay", "stale")


def _body():
    """The request body, read whole (within MAX_CONTENT_LENGTH); a body that does
    not arrive as HTTP says (malformed chunks, a client gone) is a 400."""
    sock = request.environ.get("gunicorn.socket")
    deadline = None
    if sock is not None:
        from .worker import BODY_DEADLINE, BODY_RATE, BODY_TIMEOUT, read_within
        allowed = BODY_DEADLINE + (request.content_length or 0) / BODY_RATE
        deadline = time.monotonic() + allowed
        sock.settimeout(BODY_TIMEOUT)
        read_within(sock, allowed)
    try:
        return request.get_data(cache=False)
    except HTTPException:
        if deadline is not None and time.monotonic() >= deadline:
            raise Refused(408, "too_slow", f"request body not received within {allowed:.0f} s"
                                           " (the server's limit for its size)") from None
        raise
    except Exception as e:   # gunicorn's chunked-body parser, a socket that timed out
        raise Refused(400, "malformed_body", f"malformed request body: {type(e).__name__}"
                                        f"{': ' + str(e)[:100] if str(e) else ''}") from None


def _check_request(endpoint, admit):
    sent = request.headers.get(wire.PROTOCOL_HEADER)
    if sent is None:
        raise Refused(400, "protocol_version",
                      f"request has no {wire.PROTOCOL_HEADER} header; this server speaks"
                      f" protocol {PROTOCOL_VERSION}")
    if sent != str(PROTOCOL_VERSION):
        raise Refused(400, "protocol_version",
                      f"client speaks protocol {sent[:16]!r}, this server speaks protocol"
                      f" {PROTOCOL_VERSION}")
    key_id = request.headers.get(wire.KEY_HEADER, "")
    if len(key_id) != KEY_ID_LEN or not all(c in "0123456789abcdef" for c in key_id):
        raise Refused(401, "unknown_key", "missing or malformed key id")
    blob = _body()
    store = _store()
    key = store.get_key(key_id)
    if key is None:
        raise Refused(401, "unknown_key", f"key '{key_id}' is not registered on this server")
    try:
        ts, nonce = crypto.peek(blob)
    except crypto.FormatError as e:
        raise Refused(400, "malformed", str(e)) from None
    g.sk_seal = (key, endpoint, nonce)   # from here on, answers are sealed for the device
    try:
        _, nonce, plain = wire.open_request_seal(key.master, key_id, endpoint, blob)
    except crypto.CryptoError:
        raise Refused(401, "bad_key", f"request failed authentication under key '{key_id}':"
                                      " wrong key, or altered") from None
    now = int(time.time() * 1000)
    if abs(now - ts) > wire.MAX_CLOCK_SKEW_MS:
        raise Refused(400, "stale", f"request timestamp is {abs(now - ts) / 1000:.0f} s away"
                                    " from the server's clock (limit 300 s): check the clocks")
    # a replay is refused right after the seal, before any other work
    if store.seen(key_id, nonce):
        raise _replay()
    # only a holder of the key learns why it is refused
    if key.revoked:
        raise Refused(401, "revoked", f"device '{key.device}' was revoked on {key.revoked}")
    if key.retired:
        raise Refused(401, "rotated", f"key '{key_id}' of device '{key.device}' was"
                                      f" {key.retired_why or 'retired'} on {key.retired};"
                                      " use the device's new key")
    try:
        body = wire.unpack(plain, containers=wire.MAX_CONTAINERS)
    except wire.WireError as e:
        raise Refused(e.status, e.code, str(e)) from None
    ticket = (key_id, key.device, nonce, ts + 2 * wire.MAX_CLOCK_SKEW_MS)
    if not admit:
        return key, nonce, body, ticket   # the caller admits it in its own transaction
    if not store.admit(*ticket):
        raise _replay()
    return key, nonce, body


def _replay():
    return Refused(400, "replay", "request nonce was seen before: replayed request refused")


def _sealed(key, endpoint, nonce, obj, attachments=()):
    blob = wire.seal_response(key.master, key.key_id, endpoint, nonce, obj, attachments)
    return Response(blob, status=200, content_type=wire.CONTENT_TYPE)


@api.post("/api/hello")
def hello():
    key, nonce, _ = _authenticate("hello")
    return _sealed(key, "hello", nonce, {
        "device": key.device, "team": key.team, "protocol": PROTOCOL_VERSION,
        "server_time": int(time.time() * 1000), "head": _store().head(key.team)})


@api.post("/api/push")
def push():
    key, nonce, body, ticket = _authenticate("push", admit=False)
    try:
        batch, relay = parse_batch(body)
        known = parse_known(body.get("known"))
        queued = parse_queued(body.get("queued"))
    except Refused:
        if not _store().admit(*ticket):   # refused for its content, but seen all the same
            raise _replay() from None
        raise
    answer = push_batch(key, batch, relay, ticket, known, queued)
    return _sealed(key, "push", nonce, answer)


def parse_queued(queued):
    """The optional number of events a device says it has queued to push (for
    sk-admin status and the metrics; it changes nothing else)."""
    if queued is not None and (type(queued) is not int or not 0 <= queued < 2 ** 63):
        raise Refused(400, "malformed", "'queued' must be an integer from 0 to 2^63-1")
    return queued


def parse_batch(body):
    """The sealed Batch of a push (or reseal) body, and the manifest indexes of the
    events it relays: {"epoch", "writer", "events": manifest, "relay"} and the
    sealed content as its one attachment."""
    events, attachments = body.get("events"), body.get("attachments")
    if isinstance(events, list) and len(events) > wire.MAX_BATCH:
        raise Refused(413, "too_large", f"{len(events)} events in one push; the limit is"
                                        f" {wire.MAX_BATCH}")
    epoch, writer, relay = body.get("epoch"), body.get("writer"), body.get("relay", [])
    try:
        if type(epoch) is not int or not 1 <= epoch < 2 ** 31:
            raise sealed.SealedError("'epoch' must be a key epoch (an integer from 1)")
        if writer is not None and not isinstance(writer, dict):
            raise sealed.SealedError("'writer' must be {\"seq\", \"chain\"} or null")
        manifest, point = sealed.check_manifest(
            events, None if writer is None else (writer.get("seq"), writer.get("chain", "")))
        if not isinstance(attachments, list) or len(attachments) != 1:
            raise sealed.SealedError("a push carries its sealed batch as its one attachment")
        if len(attachments[0]) < 1 + 12 + crypto.TAG_LEN or attachments[0][0] != crypto.DATA_VERSION:
            raise sealed.SealedError("the attachment is not sealed data of version 2")
        if not isinstance(relay, list) or any(type(i) is not int or not 0 <= i < len(manifest)
                                              for i in relay):
            raise sealed.SealedError("'relay' must list indexes of the manifest")
    except sealed.SealedError as e:
        raise Refused(400, "malformed", str(e)) from None
    return Batch(epoch, manifest, point, attachments[0]), set(relay)


def push_batch(key, batch, relay=(), ticket=None, known=None, queued=None):
    """Store a sealed batch for device `key`; the answer: each event's status, one
    letter in the batch's order (accepted "a", duplicate "d", rejected "r", with
    reasons by index), and the log's new (head, chain), or why nothing was stored (diverged,
    node_taken, rekey). The REST push (with its request's ticket) and the
    WebSocket push come here; `queued`, what the device says it has queued, is
    kept in the same transaction."""
    stored = _store().push(key.team, key.device, batch, ticket, known, relay, queued)
    if stored is None:
        raise _replay()
    if stored.refused:
        raise Refused(400, "malformed", stored.refused)
    for why in ("diverged", "node_taken", "rekey"):
        if getattr(stored, why):
            if why == "node_taken":   # refused for good (the others are settled and retried)
                ops.pushed(key.team, (), "node_taken", len(batch.manifest))
            return {why: getattr(stored, why), "head": stored.head, "team": key.team}
    ops.pushed(key.team, stored.results)
    statuses = "".join(status[0] for status, _ in stored.results)   # accepted: "a", ...
    if "a" in statuses:
        notify = current_app.extensions.get("sk_notify")
        if notify:
            notify(key.team)
    answer = {"statuses": statuses, "head": stored.head, "chain": stored.chain.hex(),
              "team": key.team}
    reasons = {str(i): why for i, (_, why) in enumerate(stored.results) if why}
    if reasons:
        answer["reasons"] = reasons
    if wanted(key.team):
        answer["snapshot_wanted"] = True
    return answer


def parse_known(known):
    """The optional {"seq": int, "chain": hex} a device last saw of its team's log."""
    if known is None:
        return None
    try:
        seq, chain = known["seq"], bytes.fromhex(known["chain"])
        if type(seq) is not int or not 0 <= seq < 2 ** 63 or len(chain) != 32:
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise Refused(400, "malformed", "'known' must be {\"seq\": integer, \"chain\":"
                                        " 64 hex digits}") from None
    return seq, chain


def parse_skip(skip, device):
    """The optional {"node_id": str, "upto": int} of a pull: the events this device
    pushed under its node id up to that clock, which it holds, are left out."""
    if skip is None:
        return None
    if (not isinstance(skip, dict) or not isinstance(skip.get("node_id"), str)
            or type(skip.get("upto")) is not int or not 0 <= skip["upto"] < 2 ** 63):
        raise Refused(400, "malformed", "'skip' must be {\"node_id\": text, \"upto\": integer}")
    return device, skip["node_id"], skip["upto"]


@api.post("/api/pull")
def pull():
    key, nonce, body = _authenticate("pull")
    after, limit = body.get("after", 0), body.get("limit", 1000)
    if type(after) is not int or not 0 <= after < 2 ** 63:
        raise Refused(400, "malformed", "'after' must be an integer from 0 to 2^63-1")
    if type(limit) is not int or not 1 <= limit <= wire.MAX_PAGE:
        raise Refused(400, "malformed", f"'limit' must be an integer from 1 to {wire.MAX_PAGE}")
    queued = parse_queued(body.get("queued"))
    store = _store()
    page = store.pull(key.team, after, limit, parse_skip(body.get("skip"), key.device),
                      parse_known(body.get("known")))
    extra = {"snapshot_wanted": True} if not page.more and wanted(key.team) else {}
    text, attachments = page_out(page, team=key.team, **extra)
    ops.pulled(key.team, page)
    store.note_device(key.device, pulled=None if page.diverged else page.next, queued=queued,
                      end=not page.more)
    return _sealed(key, "pull", nonce, text, attachments)


def page_out(page, **fields):
    """A store Page as the wire's pull answer (page_text); Damaged if what the store
    read cannot be said as it should (a cell altered at rest)."""
    try:
        return page_text(page, **fields)
    except UNREADABLE as e:
        first = page.rows[0][0] if page.rows else None
        raise Damaged.at(first - 1 if type(first) is int else None, e) from None


def page_text(page, **fields):
    """A store Page as the wire's pull answer (REST) or events frame (WebSocket,
    which adds its own fields): (JSON text, attachments). rows are [seq, batch
    index, manifest index] for a sealed event, [seq, null, event_id] for one the
    puller pushed itself, [seq, "legacy", [event_id, node_id, lamport_clock,
    event_type, aggregate_type, aggregate_id, payload, timestamp]] for one from
    before end-to-end encryption; batches [{"epoch", "manifest", "device"}] in the
    order of the attachments that hold their sealed content. Stored text is never
    parsed here."""
    head = "".join(f"{dumps(k)}:{dumps(v)}," for k, v in fields.items())
    if page.diverged:
        return (f'{{{head}"diverged":{dumps(page.diverged)},"rows":[],"batches":[],'
                f'"next":{int(page.next)},"more":false}}'), ()
    order = {b: i for i, b in enumerate(sorted(page.batches))}
    rows = []
    for seq, eid, batch, idx in page.rows:
        if batch is not None:
            rows.append(f"[{int(seq)},{order[batch]},{int(idx)}]")
        elif seq in page.legacy:
            node, clock, etype, atype, aid, payload, ts = page.legacy[seq]
            rows.append(f'[{int(seq)},"legacy",[{dumps(eid)},{dumps(node)},{int(clock)},'
                        f"{dumps(etype)},{dumps(atype)},{dumps(aid)},{payload},{dumps(ts)}]]")
        else:
            rows.append(f"[{int(seq)},null,{dumps(eid)}]")
    batches, attachments = [], []
    for b in sorted(page.batches):
        epoch, manifest, blob, device = page.batches[b]
        batches.append(f'{{"epoch":{int(epoch)},"manifest":{dumps(manifest.decode())},'
                       f'"device":{dumps(device)}}}')
        attachments.append(blob)
    chain = f',"chain":"{page.chain.hex()}"' if page.chain is not None else ""
    return (f'{{{head}"rows":[{",".join(rows)}],"batches":[{",".join(batches)}],'
            f'"next":{int(page.next)},"more":{"true" if page.more else "false"}{chain}}}',
            attachments)


@api.post("/api/keys")
def keys():
    """The team key's state for this device, after storing what it sends: its
    identity (if the server has none), a new epoch with its grants, grants for
    others, the approval mode, approvals. Nothing here is readable by the server:
    grants are sealed to each device's identity."""
    key, nonce, body = _authenticate("keys")
    try:
        identity = _hex(body.get("identity"), 32, "identity")
        epoch = body.get("epoch")
        grants = [(g["epoch"], g["device"], _hex(g["recipient"], 32, "recipient"),
                   _hex(g["sealed"], crypto.GRANT_LEN, "grant"))
                  for g in body.get("grants", [])]
        approvals = [(a["device"], _hex(a["identity"], 32, "identity"),
                      _hex(a["record"], 32, "approval")) for a in body.get("approvals", [])]
        if epoch is not None and (type(epoch) is not int or not 1 <= epoch < 2 ** 31):
            raise ValueError("'epoch' must be an integer from 1")
        if any(type(g[0]) is not int or not isinstance(g[1], str) for g in grants):
            raise ValueError("a grant is {\"epoch\", \"device\", \"recipient\", \"sealed\"}")
        if any(not isinstance(a[0], str) for a in approvals):
            raise ValueError("an approval is {\"device\", \"identity\", \"record\"}")
        if len(grants) > 10_000 or len(approvals) > 1000:
            raise ValueError("too many grants or approvals in one request")
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise Refused(400, "malformed", f"malformed keys request: {e}") from None
    store = _store()
    refused = store.put_keys(key.team, key.device, identity, epoch, grants,
                             body.get("approval") is True, approvals)
    state = keys_out(store.keys(key.team, key.device))
    if refused:
        state["refused"] = refused
    return _sealed(key, "keys", nonce, {**state, "team": key.team, "device": key.device})


def _hex(value, size, what):
    if value is None:
        return None
    raw = bytes.fromhex(value)
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes")
    return raw


def keys_out(state):
    """The store's key state with its bytes as hex, for the wire."""
    def h(b):
        return b.hex() if b is not None else None
    return {**state, "identity": h(state["identity"]),
            "grants": [{**g, "sealed": h(g["sealed"]), "granter": h(g["granter"])}
                       for g in state["grants"]],
            "members": [{**m, "identity": h(m["identity"]), "approval": h(m["approval"])}
                        for m in state["members"]]}


@api.post("/api/reseal")
def reseal():
    """A member seals events the server still holds in plaintext (from before end-
    to-end encryption): the plaintext is replaced and deleted."""
    key, nonce, body = _authenticate("reseal")
    batch, _ = parse_batch(body)
    first = body.get("first")
    if type(first) is not int or not 1 <= first < 2 ** 63:
        raise Refused(400, "malformed", "'first' must be the seq of the first event sealed")
    try:
        n = _store().reseal(key.team, key.device, first, batch)
    except StoreError as e:
        raise Refused(409, "conflict", str(e)) from None
    return _sealed(key, "reseal", nonce, {"sealed": n, "team": key.team})


@api.post("/api/snapshot")
def snapshot():
    """A member's sealed snapshot of the team's state as of (seq, chain)."""
    key, nonce, body = _authenticate("snapshot")
    seq, chain, epoch = body.get("seq"), body.get("chain"), body.get("epoch")
    blobs = body.get("attachments", [])
    try:
        point = parse_known({"seq": seq, "chain": chain})
        if type(epoch) is not int or epoch < 1 or len(blobs) != 1:
            raise Refused(400, "malformed", "a snapshot is {seq, chain, epoch} and its sealed"
                                            " content as its one attachment")
        _store().put_snapshot(key.team, key.device, point[0], point[1], epoch, blobs[0])
    except StoreError as e:
        raise Refused(409, "conflict", str(e)) from None
    return _sealed(key, "snapshot", nonce, {"seq": seq, "team": key.team})


@api.post("/api/snapshot-get")
def snapshot_get():
    """The team's newest snapshot (a shallow device starts from it)."""
    key, nonce, _ = _authenticate("snapshot-get")
    snap = _store().snapshot(key.team)
    if snap is None:
        return _sealed(key, "snapshot-get", nonce, {"seq": None, "team": key.team})
    seq, chain, epoch, blob, device = snap
    return _sealed(key, "snapshot-get", nonce, {"seq": seq, "chain": chain.hex(), "epoch": epoch,
                                                "device": device, "team": key.team}, [blob])


def wanted(team):
    """Whether to ask the device at hand for a snapshot (SNAPSHOT_EVERY events): only
    advice, so a snapshot row that cannot be read asks for none (and is logged)."""
    try:
        return _store().snapshot_due(team, current_app.config["SNAPSHOT_EVERY"])
    except Damaged as e:
        current_app.logger.error("snapshot_due of team '%s': %s", team, e, exc_info=e)
        return False


@api.post("/api/ws-token")
def ws_token():
    """A single-use token (5 minutes) that opens one WebSocket session."""
    key, nonce, _ = _authenticate("ws-token")
    token = secrets.token_urlsafe(32)
    _store().add_ws_token(wire.token_hash(token), key.key_id,
                          int(time.time() * 1000) + wire.WS_TOKEN_TTL_MS)
    return _sealed(key, "ws-token", nonce, {"token": token, "team": key.team,
                                            "expires_in": wire.WS_TOKEN_TTL_MS // 1000})


@api.get("/healthz")
def healthz():
    """Alive: the process answers. Nothing else is said."""
    return jsonify({"ok": True, "protocol": PROTOCOL_VERSION})


@api.get("/readyz")
def readyz():
    """Ready: the database answers (503 otherwise), for a load balancer's check."""
    try:
        _store().ping(quick=True)
    except StoreError:
        _store().reset()
        resp = jsonify({"ok": False, "database": "unavailable"})
        resp.status_code = 503
        resp.headers["Retry-After"] = "5"
        return resp
    return jsonify({"ok": True, "database": "ok"})
