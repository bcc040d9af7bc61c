"""Every format of protocol 2 (PROTOCOL.md) pinned by a known answer, checked
against an independent implementation written here with other primitives (pyca
cryptography, the standard library), and refused when tampered with: identities,
fingerprints, grants, data keys, sealed batches, framed bodies, approvals."""

import gzip
import hashlib
import hmac
import json
import struct
import zlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sk import crypto, sealed, wire
from sk.event import Event
from sk.keyring import approval_record

API_KEY = "sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
IDENTITY_PRIVATE = "cc549fa98bac07926a7bb0452b3848161d97ab99da31c27ecaf739c2972f0ab8"
IDENTITY_PUBLIC = "350fff221653fb335ea0c5c9718dca56794545aa0807ce62fc9d1beb2e74ba0f"
FINGERPRINT = "53c1 8d71 284a 8f36 1e38"
RECIPIENT_PRIVATE = bytes(range(64, 96))
RECIPIENT_PUBLIC = "79a631eede1bf9c98f12032cdeadd0e7a079398fc786b88cc846ec89af85a51a"
TEAM_KEY = bytes(range(100, 132))
EPHEMERAL = bytes(range(200, 232))
GRANT = ("024d5bab89b0733d9d8dcecf04f321c90b761b7765a6bdb2bddbfad3e7abdf1f661dc7fbc7b49f8f7bd"
         "2282d67aa053054c7c184c86f1158db2e2e45717ea7d1749937b5b73d213c006260293d4639500b")
DATA_KEY = "2cda7e3a066f2b219c7e18a1f5a95953fef6e4a20740e7c2df2cc39ef386b6fd"
EVENT = Event("0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b", "feature_created", "feature", "F-1", 7,
              "node-a", '{"title":"Login"}', "2026-01-31T12:00:00Z")
WRITER = (5, "ab" * 32)
BATCH = ("02000102030405060708090a0bd0d4f22b52a18041d9a336b24893fc395604db8f07f48862088a72c56534"
         "89c586daaeb562b357481cf05ea5c01c23afa783ea2e9bf449ff7458587be7da44da7d201931dfbb84e40"
         "9917875af86ad68c7d3d693a9d8cb978fa34ea9f9b32acaf2e77724eaf55d10803a32620b96b8f2daf2eb"
         "c72a81fa34a8b13a774e1902b5")
PACKED = "000000010000001b1f8b0800000000000003ab564a54b232ac0500afac1b5607000000000000027879"
APPROVAL = "68261f71fd8487ed0d1a62e5cda8e36c1e074965bd261d6eb06b4966af28ffc2"


# -- an independent implementation of the formats, from PROTOCOL.md ----------------------
def hkdf(ikm, salt, info):
    return HKDF(hashes.SHA256(), 32, salt or None, info).derive(ikm)


def x25519_public(private):
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519(private, public):
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public))


def ref_identity(api_key):
    _, key_id, secret = api_key.split(".")
    secret = __import__("base64").urlsafe_b64decode(secret + "=")
    return hkdf(secret, key_id.encode(), b"sk/2 identity")


def ref_open_grant(team, epoch, grant, recipient_private, granter_public):
    assert grant[0] == 2 and len(grant) == 81
    eph = grant[1:33]
    recipient = x25519_public(recipient_private)
    k = hkdf(x25519(recipient_private, eph) + x25519(recipient_private, granter_public),
             eph + recipient + granter_public, f"sk/2 grant|{team}|{epoch}".encode())
    return AESGCM(k).decrypt(bytes(12), grant[33:], b"sk/2 grant")


def ref_canonical(manifest, writer):
    return ("sk/2 manifest\n" + f"{writer[0]}\t{writer[1]}\n"
            + "".join(f"{e}\t{n}\t{c}\n" for e, n, c in manifest)).encode()


def ref_open_batch(team, epoch, team_key, manifest, writer, blob):
    key = hkdf(team_key, b"", f"sk/2 events|{team}".encode())
    ad = f"sk/2 batch|{team}|{epoch}|".encode() + hashlib.sha256(
        ref_canonical(manifest, writer)).hexdigest().encode()
    assert blob[0] == 2
    content = gzip.decompress(AESGCM(key).decrypt(blob[1:13], blob[13:], ad))
    return json.loads(content)["events"]


def ref_seal_batch(team, epoch, team_key, manifest, writer, rows, nonce, **dumps_kw):
    key = hkdf(team_key, b"", f"sk/2 events|{team}".encode())
    ad = f"sk/2 batch|{team}|{epoch}|".encode() + hashlib.sha256(
        ref_canonical(manifest, writer)).hexdigest().encode()
    content = gzip.compress(json.dumps({"events": rows}, **dumps_kw).encode())
    return b"\x02" + nonce + AESGCM(key).encrypt(nonce, content, ad)


def ref_unpack(plain):
    count, n = struct.unpack_from(">II", plain)
    obj = json.loads(gzip.decompress(plain[8:8 + n]))
    at, out = 8 + n, []
    for _ in range(count):
        (size,) = struct.unpack_from(">I", plain, at)
        out.append(plain[at + 4:at + 4 + size])
        at += 4 + size
    return obj, out


# -- known answers, and sk against the reference --------------------------------------------
def test_identity_and_fingerprint_known_answers():
    private = crypto.identity_secret(API_KEY)
    assert private.hex() == IDENTITY_PRIVATE == ref_identity(API_KEY).hex()
    assert crypto.identity_public(private).hex() == IDENTITY_PUBLIC == x25519_public(private).hex()
    digest = hashlib.sha256(b"sk/2 fingerprint|" + bytes.fromhex(IDENTITY_PUBLIC)).hexdigest()
    assert crypto.fingerprint(bytes.fromhex(IDENTITY_PUBLIC)) == FINGERPRINT
    assert FINGERPRINT.replace(" ", "") == digest[:20]
    # the server's master is another HKDF output of the secret: the identity is not it
    assert crypto.derive_master(API_KEY) != private


def test_grant_known_answer_and_reference():
    granter = crypto.identity_secret(API_KEY)
    grant = crypto.seal_grant("core", 3, TEAM_KEY, granter, bytes.fromhex(RECIPIENT_PUBLIC),
                              ephemeral=EPHEMERAL)
    assert grant.hex() == GRANT
    assert crypto.identity_public(RECIPIENT_PRIVATE).hex() == RECIPIENT_PUBLIC
    assert ref_open_grant("core", 3, grant, RECIPIENT_PRIVATE,
                          bytes.fromhex(IDENTITY_PUBLIC)) == TEAM_KEY
    assert crypto.open_grant("core", 3, grant, RECIPIENT_PRIVATE,
                             bytes.fromhex(IDENTITY_PUBLIC)) == TEAM_KEY


def test_data_key_and_approval_known_answers():
    assert crypto.data_key(TEAM_KEY, "core", "events").hex() == DATA_KEY
    assert hkdf(TEAM_KEY, b"", b"sk/2 events|core").hex() == DATA_KEY
    record = approval_record(TEAM_KEY, "core", "bob", bytes.fromhex(RECIPIENT_PUBLIC))
    ref = hmac.new(hkdf(TEAM_KEY, b"", b"sk/2 approval|core"),
                   b"approve|core|bob|" + bytes.fromhex(RECIPIENT_PUBLIC), "sha256").digest()
    assert record.hex() == APPROVAL == ref.hex()


def test_sealed_batch_known_answer_and_reference_both_ways():
    manifest, writer, blob = sealed.seal_batch("core", 3, TEAM_KEY, [EVENT], WRITER,
                                               [{"actor": "ada"}], nonce=bytes(range(12)))
    assert blob.hex() == BATCH
    assert manifest == [[EVENT.event_id, "node-a", 7]] and writer == WRITER
    rows = ref_open_batch("core", 3, TEAM_KEY, [tuple(m) for m in manifest], writer, blob)
    assert rows == [["feature_created", "feature", "F-1", {"title": "Login"},
                     "2026-01-31T12:00:00Z", {"actor": "ada"}]]
    # and sk opens what the reference seals
    mine = ref_seal_batch("team-x", 9, TEAM_KEY, [(EVENT.event_id, "n2", 11)], (0, ""),
                          [["x_set", "x", "1", {"v": [1, 2]}, "2026-02-01T00:00:00Z", {}]],
                          bytes(range(20, 32)))
    [(ev, extra)] = sealed.open_batch("team-x", 9, TEAM_KEY, [(EVENT.event_id, "n2", 11)],
                                      (0, ""), mine)
    assert ev.to_dict() == {"event_id": EVENT.event_id, "event_type": "x_set",
                            "aggregate_type": "x", "aggregate_id": "1", "lamport_clock": 11,
                            "node_id": "n2", "payload": {"v": [1, 2]},
                            "timestamp": "2026-02-01T00:00:00Z"} and extra == {}


def test_framed_body_known_answer_and_reference():
    assert wire.pack({"a": 1}, [b"xy"]).hex() == PACKED
    assert ref_unpack(bytes.fromhex(PACKED)) == ({"a": 1}, [b"xy"])
    assert wire.unpack(bytes.fromhex(PACKED)) == {"a": 1, "attachments": [b"xy"]}


# -- tampering ---------------------------------------------------------------------------
MANIFEST = [(EVENT.event_id, "node-a", 7)]


def test_every_flipped_byte_of_a_batch_is_refused():
    blob = bytes.fromhex(BATCH)
    assert sealed.open_batch("core", 3, TEAM_KEY, MANIFEST, WRITER, blob)
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises(sealed.SealedError):
                sealed.open_batch("core", 3, TEAM_KEY, MANIFEST, WRITER, bytes(bad))


def test_a_truncated_batch_is_refused_at_every_length():
    blob = bytes.fromhex(BATCH)
    for n in range(len(blob)):
        with pytest.raises((sealed.SealedError, crypto.CryptoError)):
            sealed.open_batch("core", 3, TEAM_KEY, MANIFEST, WRITER, blob[:n])


@pytest.mark.parametrize("change", [
    {"team": "other"},                                   # moved to another team
    {"epoch": 2},                                        # another key epoch
    {"manifest": [("0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2c", "node-a", 7)]},   # another id
    {"manifest": [(EVENT.event_id, "node-b", 7)]},       # another node
    {"manifest": [(EVENT.event_id, "node-a", 8)]},       # another clock
    {"writer": (4, "ab" * 32)},                          # another position in the log
    {"writer": (5, "cd" * 32)},
    {"key": bytes(32)},                                  # a wrong (or revoked) team key
])
def test_a_batch_moved_to_another_id_team_epoch_or_place_is_refused(change):
    args = {"team": "core", "epoch": 3, "key": TEAM_KEY, "manifest": MANIFEST, "writer": WRITER}
    args.update(change)
    with pytest.raises(sealed.Unauthentic):
        sealed.open_batch(args["team"], args["epoch"], args["key"], args["manifest"],
                          args["writer"], bytes.fromhex(BATCH))


def test_a_grant_opens_only_for_its_recipient_team_epoch_and_granter():
    grant = bytes.fromhex(GRANT)
    granter = bytes.fromhex(IDENTITY_PUBLIC)
    ok = ("core", 3, grant, RECIPIENT_PRIVATE, granter)
    assert crypto.open_grant(*ok) == TEAM_KEY
    for bad in (("other", 3, grant, RECIPIENT_PRIVATE, granter),
                ("core", 4, grant, RECIPIENT_PRIVATE, granter),
                ("core", 3, grant, bytes(range(1, 33)), granter),          # someone else
                ("core", 3, grant, RECIPIENT_PRIVATE, crypto.identity_public(bytes(range(7, 39))))):
        with pytest.raises(crypto.CryptoError):
            crypto.open_grant(*bad)
    for i in range(len(grant)):
        tampered = bytearray(grant)
        tampered[i] ^= 0x01
        with pytest.raises(crypto.CryptoError):
            crypto.open_grant("core", 3, bytes(tampered), RECIPIENT_PRIVATE, granter)


def test_an_authentic_batch_holding_invalid_events_is_told_apart():
    """A member's broken batch authenticates: it is Invalid (skipped by readers),
    not Unauthentic (which stops them)."""
    blob = ref_seal_batch("core", 3, TEAM_KEY, MANIFEST, WRITER,
                          [["Bad Type!", "x", "1", {}, "2026-02-01T00:00:00Z", {}]],
                          bytes(range(12)))
    with pytest.raises(sealed.Invalid):
        sealed.open_batch("core", 3, TEAM_KEY, MANIFEST, WRITER, blob)
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    key = hkdf(TEAM_KEY, b"", b"sk/2 events|core")
    ad = b"sk/2 batch|core|3|" + hashlib.sha256(ref_canonical(MANIFEST, WRITER)).hexdigest().encode()
    bomb = b"\x02" + bytes(12) + AESGCM(key).encrypt(
        bytes(12), z.compress(b" " * (9 << 20)) + z.flush(), ad)
    with pytest.raises(sealed.Invalid):
        sealed.open_batch("core", 3, TEAM_KEY, MANIFEST, WRITER, bomb)


COMPACT = {"separators": (",", ":")}   # as sk writes content (read by cutting it)
SPACED = {}                             # as json.dumps writes it (read whole)
ROWS = [["x_set", "x", "1", {"v": [1, 2.5, None, True], "s": "caf\u00e9 \"q\""},
         "2026-02-01T00:00:00Z", {"prior": {"v": [[3, "n1"]]}, "actor": "ada"}],
        ["x_deleted", "x", "a \"quoted\" id", {}, "2026-02-01T00:00:01.5Z", {}]]
IDS = ["0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2" + c for c in "bc"]
TWO = [(IDS[0], "n2", 11), (IDS[1], "n2", 12)]


@pytest.mark.parametrize("style", [COMPACT, SPACED, {**COMPACT, "ensure_ascii": False}])
def test_a_batch_reads_the_same_however_its_content_is_spaced(style):
    """sk cuts each payload's and extra's text out of content it wrote (no spacing)
    instead of writing them again; any other spacing is read whole. Both give the
    same events, with the payload's text as sk writes it."""
    blob = ref_seal_batch("core", 3, TEAM_KEY, TWO, WRITER, ROWS, bytes(12), **style)
    got = sealed.open_batch("core", 3, TEAM_KEY, TWO, WRITER, blob, payloads=True)
    assert [ev.payload for ev, *_ in got] == ['{"v":[1,2.5,null,true],"s":"café \\"q\\""}', "{}"]
    assert [ev.aggregate_id for ev, *_ in got] == ["1", 'a "quoted" id']
    assert [(extra, payload) for _, extra, payload, _ in got] == [(r[5], r[3]) for r in ROWS]
    assert [json.loads(text) if text else None for *_, text in got] == [ROWS[0][5], None]
    assert got[1][0].timestamp == "2026-02-01T00:00:01.5Z"
    cut = sealed._rows(json.dumps({"events": ROWS}, **style))
    assert (cut is not None) == (style is not SPACED)   # the way sk writes it is cut
    if cut:
        assert [r[4] for r in cut] == [json.dumps(r[3], **style) for r in ROWS]


@pytest.mark.parametrize("style", [COMPACT, SPACED])
@pytest.mark.parametrize("row", [
    ["x_set", "x", "1", {"v": "\ud800"}, "2026-02-01T00:00:00Z", {}],    # a lone surrogate
    ["x_set", "x", "1", {"v": 1e999}, "2026-02-01T00:00:00Z", {}],       # infinity
    [["x_set"], "x", "1", {}, "2026-02-01T00:00:00Z", {}],               # a type not text
    ["x_set", {"x": 1}, "1", {}, "2026-02-01T00:00:00Z", {}],
    ["x_set", "x", "", {}, "2026-02-01T00:00:00Z", {}],                  # an empty id
    ["x_set", "x", "1", [], "2026-02-01T00:00:00Z", {}],                 # payload not an object
    ["x_set", "x", "1", {}, "yesterday", {}],
    ["x_set", "x", "1", {}, "2026-02-01T00:00:00Z", []],                 # extra not an object
    ["x_set", "x", "1", {}, "2026-02-01T00:00:00Z", {"actor": "\ud800"}],
    ["x_set", "x", "1", {}, "2026-02-01T00:00:00Z", {"seen": [1e999, "n"]}],
    ["x_set", "x", "1", {}, "2026-02-01T00:00:00Z", {}, "more"],         # 7 values
    ["x_set", "x", "1", {}, "{}", "2026-02-01T00:00:00Z", {}, "{}"],     # 8 (what sk cuts)
])
def test_an_invalid_event_is_refused_however_its_content_is_spaced(style, row):
    text = json.dumps(row, allow_nan=True, **style)
    if style is COMPACT:   # the writer of an infinity, a lone surrogate: not json.dumps
        text = text.replace("Infinity", "1e999")
    blob = b"\x02" + bytes(12) + AESGCM(hkdf(TEAM_KEY, b"", b"sk/2 events|core")).encrypt(
        bytes(12), gzip.compress(('{"events":[' + text + "]}").encode()),
        b"sk/2 batch|core|3|" + hashlib.sha256(ref_canonical(MANIFEST, WRITER)).hexdigest().encode())
    with pytest.raises(sealed.Invalid):
        sealed.open_batch("core", 3, TEAM_KEY, MANIFEST, WRITER, blob, payloads=True)


# -- snapshots ---------------------------------------------------------------------------
SNAP_CHAIN = "ab" * 32
SNAP_TEXT = ('{"seq":90,"chain":"' + SNAP_CHAIN + '","aggregates":[["task","t1",7,"node-a",0,""]],'
             '"fields":[["task","t1","title","Login",7,"node-a",'
             '"0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b","task_updated","2026-01-31T12:00:00Z","ada"]],'
             '"conflicts":[]}')
SNAPSHOT = ("02000102030405060708090a0b91306423caee02a5c03ed44bb3d6a5901f789efdc0d98cac6ec117a3"
            "cdae55cc841eb36705e9038129ea5647ac5df607c6ca27b934fa5006baa7d5ea7704789517fc31f956"
            "34debc7ae0a901f7f1d3cd81a5e0d8f9c78b5508c5744e911102439bd2373a5f93ee811d23c0f01235"
            "1f9a3825338b6a66fd5becd6969ece19c6532a2761a65543ab2e3a092d0eaa2d99e1d754be2c363702"
            "5dce50e5f88ff40f52cd9e1e5e93e3c648918787f97e83903c19fda05852810bf8d3204301fd269058"
            "1bff04")


def ref_snapshot_ad(team, epoch, seq, chain):
    return f"sk/2 snapshot|{team}|{epoch}|{seq}|{chain}".encode()


def ref_open_snapshot(team, epoch, team_key, seq, chain, blob):
    key = hkdf(team_key, b"", f"sk/2 snapshot|{team}".encode())
    assert blob[0] == 2
    return json.loads(gzip.decompress(AESGCM(key).decrypt(
        blob[1:13], blob[13:], ref_snapshot_ad(team, epoch, seq, chain))))


def test_snapshot_known_answer_and_reference_both_ways():
    from sk import snapshot
    blob = snapshot.seal("core", 3, TEAM_KEY, 90, SNAP_CHAIN, SNAP_TEXT, nonce=bytes(range(12)))
    assert blob.hex() == SNAPSHOT
    assert ref_open_snapshot("core", 3, TEAM_KEY, 90, SNAP_CHAIN, blob) == json.loads(SNAP_TEXT)
    assert snapshot.open_("core", 3, TEAM_KEY, 90, SNAP_CHAIN, blob) == json.loads(SNAP_TEXT)
    # sk opens what the reference seals
    content = {"seq": 4, "chain": "cd" * 32, "aggregates": [], "fields": [], "conflicts": []}
    key = hkdf(TEAM_KEY, b"", b"sk/2 snapshot|team-x")
    nonce = bytes(range(40, 52))
    mine = b"\x02" + nonce + AESGCM(key).encrypt(
        nonce, gzip.compress(json.dumps(content).encode()),
        ref_snapshot_ad("team-x", 1, 4, "cd" * 32))
    assert snapshot.open_("team-x", 1, TEAM_KEY, 4, "cd" * 32, mine) == content


@pytest.mark.parametrize("change", [
    {"team": "other"}, {"epoch": 2}, {"seq": 91}, {"chain": "cd" * 32}, {"key": bytes(32)},
])
def test_a_snapshot_moved_to_another_team_epoch_or_point_is_refused(change):
    from sk import snapshot
    from sk.errors import IntegrityError
    args = {"team": "core", "epoch": 3, "key": TEAM_KEY, "seq": 90, "chain": SNAP_CHAIN}
    args.update(change)
    with pytest.raises(IntegrityError, match="failed authentication"):
        snapshot.open_(args["team"], args["epoch"], args["key"], args["seq"], args["chain"],
                       bytes.fromhex(SNAPSHOT))


def test_every_flipped_byte_of_a_snapshot_is_refused():
    from sk import snapshot
    from sk.errors import IntegrityError
    blob = bytes.fromhex(SNAPSHOT)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(IntegrityError):
            snapshot.open_("core", 3, TEAM_KEY, 90, SNAP_CHAIN, bytes(bad))


def test_an_authentic_snapshot_for_another_point_inside_is_refused():
    """Sealed by a member for (90, chain) but saying another point inside: not applied."""
    from sk import snapshot
    from sk.errors import IntegrityError
    inner = SNAP_TEXT.replace('"seq":90', '"seq":12')
    blob = snapshot.seal("core", 3, TEAM_KEY, 90, SNAP_CHAIN, inner)
    with pytest.raises(IntegrityError, match="not the one it was sealed for"):
        snapshot.open_("core", 3, TEAM_KEY, 90, SNAP_CHAIN, blob)
