"""sk.crypto and sk.wire: the key format, HKDF derivation, the sealed-message format
(known-answer vectors pin it), tamper detection, and the gzip+seal wire layer."""

import base64
import hashlib
import hmac
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sk import PROTOCOL_VERSION, crypto, wire
from sk.event import dumps

# -- fixed inputs for the known-answer vectors ---------------------------------------
KAT_SECRET = bytes(range(32))
KAT_KEY_ID = "0123456789abcdef"
KAT_API_KEY = "sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
KAT_MASTER = "9233cc3067251226dc03ff0894419f660310de384a9d6294d70ddb7eacfa6153"
KAT_C2S = "ee072f979d934e896226de7712ae7beefe4ea37dcbc578e2c713fc741205c1fd"
KAT_S2C = "9bd7141a1065c888028335f205c0ae79ecaea48d101a0714c57b18460a49c692"

KAT_SEAL_KEY = bytes(range(32))
KAT_SEAL_PLAIN = b"hello, sk"
KAT_SEAL_CONTEXT = b"sk/1|c2s|0123456789abcdef|push|"
KAT_SEAL_TS = 1767225600000          # 2026-01-01T00:00:00Z
KAT_SEAL_NONCE = bytes(range(100, 112))
KAT_SEAL_HEX = ("010000019b76daa8006465666768696a6b6c6d6e6f207eb20a16c576ed55229d8febdf"
                "3800ecd9b52a9062eca667")
KAT_SEAL_EMPTY_HEX = ("0100000000000000000000000000000000000000008197677"
                      "0fd4c49ed2eacfad75d816841")


def hkdf_sha256(ikm, salt, info, length=32):
    """RFC 5869 with the standard library only: the reference the code is checked against."""
    if not salt:
        salt = b"\x00" * 32
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def sealed_sample(plain=b"the quick brown fox", context=b"ctx|device|push"):
    return crypto.seal(KAT_SEAL_KEY, plain, context, timestamp_ms=KAT_SEAL_TS,
                       nonce=KAT_SEAL_NONCE)


# -- HKDF --------------------------------------------------------------------------
def test_reference_hkdf_matches_rfc5869_vectors():
    # RFC 5869 A.1 (with salt and info) and A.3 (empty salt and info)
    ikm = bytes.fromhex("0b" * 22)
    okm = hkdf_sha256(ikm, bytes.fromhex("000102030405060708090a0b0c"),
                      bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    okm = hkdf_sha256(ikm, b"", b"", 42)
    assert okm.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
                         "9d201395faa4b61a96c8")


@pytest.mark.parametrize("secret,salt,info", [
    (KAT_SECRET, KAT_KEY_ID.encode(), b"sk/1 master"),
    (bytes(32), b"", b"sk/1 c2s"),
    (b"\xff" * 32, b"ffffffffffffffff", b"sk/1 s2c"),
])
def test_hkdf_matches_independent_implementations(secret, salt, info):
    ours = crypto._hkdf(secret, salt, info)
    assert len(ours) == 32
    assert ours == hkdf_sha256(secret, salt, info)
    try:  # a second, independent implementation when it happens to be installed
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError:
        return
    other = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or None, info=info).derive(secret)
    assert ours == other


def test_derive_master_known_answer():
    master = crypto.derive_master(KAT_API_KEY)
    assert master.hex() == KAT_MASTER
    # the documented construction: HKDF-SHA256(secret, salt=key_id, info="sk/1 master")
    assert master == hkdf_sha256(KAT_SECRET, KAT_KEY_ID.encode(), b"sk/1 master")


def test_direction_keys_known_answer():
    master = bytes.fromhex(KAT_MASTER)
    c2s = crypto.direction_key(master, crypto.C2S)
    s2c = crypto.direction_key(master, crypto.S2C)
    assert c2s.hex() == KAT_C2S
    assert s2c.hex() == KAT_S2C
    assert c2s == hkdf_sha256(master, b"", b"sk/1 c2s")
    assert s2c == hkdf_sha256(master, b"", b"sk/1 s2c")
    assert c2s != s2c != master


@pytest.mark.parametrize("direction", ["C2S", "both", "", None, b"c2s"])
def test_direction_key_rejects_unknown_direction(direction):
    with pytest.raises(ValueError):
        crypto.direction_key(bytes(32), direction)


def test_master_depends_on_key_id_and_secret():
    other_id = KAT_API_KEY.replace(KAT_KEY_ID, "fedcba9876543210")
    other_secret = "sk1.0123456789abcdef." + base64.urlsafe_b64encode(
        bytes(range(1, 33))).rstrip(b"=").decode()
    masters = {crypto.derive_master(k) for k in (KAT_API_KEY, other_id, other_secret)}
    assert len(masters) == 3


# -- API key format ----------------------------------------------------------------
def test_new_api_key_format_and_uniqueness():
    keys = [crypto.new_api_key() for _ in range(20)]
    assert len({k for _, k in keys}) == 20
    for key_id, api_key in keys:
        assert len(key_id) == 16 and all(c in "0123456789abcdef" for c in key_id)
        parsed_id, secret = crypto.parse_api_key(api_key)
        assert parsed_id == key_id
        assert len(secret) == 32
        assert len(crypto.derive_master(api_key)) == 32


def test_parse_api_key_known_key_and_whitespace():
    assert crypto.parse_api_key(KAT_API_KEY) == (KAT_KEY_ID, KAT_SECRET)
    assert crypto.parse_api_key("  " + KAT_API_KEY + "\n") == (KAT_KEY_ID, KAT_SECRET)


@pytest.mark.parametrize("bad", [
    "",
    None,
    123,
    b"sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
    "sk2.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
    "sk1.0123456789ABCDEF.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",   # upper hex
    "sk1.0123456789abcde.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",    # 15 hex
    "sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh",    # 42 chars
    "sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8A",  # 44 chars
    "sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",  # padding
    "sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwd+h8",   # not urlsafe
    "sk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMU FRYXGBkaGxwdHh8",
    "sk1.0123456789abcdef",
    "sk1..AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
    "xsk1.0123456789abcdef.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
])
def test_parse_api_key_rejects_malformed(bad):
    with pytest.raises(ValueError):
        crypto.parse_api_key(bad)
    with pytest.raises(ValueError):
        crypto.derive_master(bad)


# -- seal: the format, pinned ----------------------------------------------------------
def test_seal_known_answer():
    blob = crypto.seal(KAT_SEAL_KEY, KAT_SEAL_PLAIN, KAT_SEAL_CONTEXT,
                       timestamp_ms=KAT_SEAL_TS, nonce=KAT_SEAL_NONCE)
    assert blob.hex() == KAT_SEAL_HEX
    assert crypto.open_sealed(KAT_SEAL_KEY, blob, KAT_SEAL_CONTEXT) == (
        KAT_SEAL_TS, KAT_SEAL_NONCE, KAT_SEAL_PLAIN)


def test_seal_known_answer_empty_everything():
    blob = crypto.seal(KAT_SEAL_KEY, b"", b"", timestamp_ms=0, nonce=bytes(12))
    assert blob.hex() == KAT_SEAL_EMPTY_HEX
    assert crypto.open_sealed(KAT_SEAL_KEY, blob, b"") == (0, bytes(12), b"")


def test_seal_layout():
    blob = bytes.fromhex(KAT_SEAL_HEX)
    assert len(blob) == 1 + 8 + 12 + len(KAT_SEAL_PLAIN) + 16
    assert blob[0] == 0x01
    assert struct.unpack(">Q", blob[1:9])[0] == KAT_SEAL_TS
    assert blob[9:21] == KAT_SEAL_NONCE
    assert KAT_SEAL_PLAIN not in blob
    assert crypto.peek(blob) == (KAT_SEAL_TS, KAT_SEAL_NONCE)


def test_seal_is_deterministic_only_in_its_inputs():
    a = sealed_sample()
    assert a == sealed_sample()
    b = crypto.seal(KAT_SEAL_KEY, b"the quick brown fox", b"ctx|device|push",
                    timestamp_ms=KAT_SEAL_TS + 1, nonce=KAT_SEAL_NONCE)
    assert a[21:] != b[21:]   # the timestamp is authenticated: the tag changes with it


def test_seal_defaults_fresh_nonce_and_current_time():
    import time
    before = int(time.time() * 1000)
    blobs = [crypto.seal(KAT_SEAL_KEY, b"same", b"ctx") for _ in range(50)]
    after = int(time.time() * 1000)
    nonces = {crypto.peek(b)[1] for b in blobs}
    assert len(nonces) == 50
    for b in blobs:
        ts, _ = crypto.peek(b)
        assert before <= ts <= after
        assert crypto.open_sealed(KAT_SEAL_KEY, b, b"ctx")[2] == b"same"


@pytest.mark.parametrize("nonce", [bytes(11), bytes(13), b""], ids=["11", "13", "empty"])
def test_seal_refuses_a_nonce_that_is_not_12_bytes(nonce):
    """The header has room for exactly 12 nonce bytes; anything else must be refused
    rather than silently padded/truncated into a blob that can never be opened."""
    try:
        blob = crypto.seal(KAT_SEAL_KEY, b"data", b"ctx", timestamp_ms=1, nonce=nonce)
    except ValueError:
        return
    assert crypto.open_sealed(KAT_SEAL_KEY, blob, b"ctx")[2] == b"data"


@settings(max_examples=60, deadline=None)
@given(plain=st.binary(max_size=300), context=st.binary(max_size=64),
       ts=st.integers(0, 2 ** 64 - 1), nonce=st.binary(min_size=12, max_size=12),
       key=st.binary(min_size=32, max_size=32))
def test_seal_open_roundtrip(plain, context, ts, nonce, key):
    blob = crypto.seal(key, plain, context, timestamp_ms=ts, nonce=nonce)
    assert len(blob) == 21 + len(plain) + 16
    assert crypto.open_sealed(key, blob, context) == (ts, nonce, plain)
    with pytest.raises(crypto.CryptoError):
        crypto.open_sealed(key, blob, context + b"x")


# -- tampering and wrong keys ----------------------------------------------------------
def test_flipping_any_bit_of_any_byte_is_detected():
    context = b"ctx|device|push"
    blob = sealed_sample(context=context)
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(crypto.CryptoError):
                crypto.open_sealed(KAT_SEAL_KEY, bytes(bad), context)


def test_flipping_the_version_byte_is_a_format_error():
    blob = bytearray(sealed_sample())
    blob[0] = 2
    with pytest.raises(crypto.FormatError, match="version 2"):
        crypto.open_sealed(KAT_SEAL_KEY, bytes(blob), b"ctx|device|push")
    with pytest.raises(crypto.FormatError):
        crypto.peek(bytes(blob))


def test_every_truncation_and_extension_is_detected():
    context = b"ctx|device|push"
    blob = sealed_sample(context=context)
    for n in range(len(blob)):
        with pytest.raises(crypto.CryptoError):
            crypto.open_sealed(KAT_SEAL_KEY, blob[:n], context)
        with pytest.raises(crypto.CryptoError):
            crypto.open_sealed(KAT_SEAL_KEY, blob[len(blob) - n:], context)
    for extra in (b"\x00", b"\x01" * 16):
        with pytest.raises(crypto.CryptoError):
            crypto.open_sealed(KAT_SEAL_KEY, blob + extra, context)


def test_too_short_is_a_format_error():
    for n in (0, 1, 20, 21, 36):
        with pytest.raises(crypto.FormatError, match="too short"):
            crypto.peek(b"\x01" * n)
    # header + empty ciphertext + tag is the minimum that parses
    assert crypto.peek(bytes.fromhex(KAT_SEAL_EMPTY_HEX)) == (0, bytes(12))


@pytest.mark.parametrize("other", [
    b"",
    b"ctx|device|push ",
    b"ctx|device|pull",
    b"ctx|other!|push",
    b"Ctx|device|push",
    b"ctx|device|pus",
])
def test_changed_associated_data_is_detected(other):
    blob = sealed_sample(context=b"ctx|device|push")
    with pytest.raises(crypto.CryptoError):
        crypto.open_sealed(KAT_SEAL_KEY, blob, other)


def test_wrong_key_is_detected():
    blob = sealed_sample()
    for key in (bytes(32), KAT_SEAL_KEY[:-1] + b"\x00", bytes(reversed(KAT_SEAL_KEY))):
        with pytest.raises(crypto.CryptoError) as info:
            crypto.open_sealed(key, blob, b"ctx|device|push")
        assert not isinstance(info.value, crypto.FormatError)


def test_swapping_the_header_of_another_message_is_detected():
    a = crypto.seal(KAT_SEAL_KEY, b"AAAA", b"c", timestamp_ms=1, nonce=bytes(12))
    b = crypto.seal(KAT_SEAL_KEY, b"BBBB", b"c", timestamp_ms=2, nonce=b"\x01" * 12)
    with pytest.raises(crypto.CryptoError):
        crypto.open_sealed(KAT_SEAL_KEY, b[:21] + a[21:], b"c")
    with pytest.raises(crypto.CryptoError):
        crypto.open_sealed(KAT_SEAL_KEY, a[:21] + b[21:], b"c")


def test_same_compares_secrets():
    assert crypto.same(b"abc", b"abc")
    assert not crypto.same(b"abc", b"abd")
    assert not crypto.same(b"abc", b"ab")


# -- wire: compression -----------------------------------------------------------------
def test_compress_roundtrip_is_gzip_of_compact_json():
    obj = {"events": [{"a": 1, "b": "é ü"}], "more": False}
    blob = wire.compress(obj)
    assert blob[:2] == b"\x1f\x8b"
    import gzip
    assert gzip.decompress(blob).decode() == dumps(obj)
    assert wire.decompress(blob) == obj


def test_decompress_accepts_exactly_the_limit():
    obj = {"a": "x" * 1000}
    size = len(dumps(obj).encode())
    assert wire.decompress(wire.compress(obj), limit=size) == obj
    with pytest.raises(wire.WireError) as info:
        wire.decompress(wire.compress(obj), limit=size - 1)
    assert info.value.status == 413 and info.value.code == "too_large"


def test_decompress_refuses_a_bomb_at_the_default_limit():
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    mib = b"a" * (1 << 20)
    parts = [c.compress(b'{"a":"')]
    parts += [c.compress(mib) for _ in range(wire.MAX_PLAIN // len(mib) + 1)]
    parts.append(c.compress(b'"}') + c.flush())
    bomb = b"".join(parts)
    assert len(bomb) < wire.MAX_BODY // 100       # small on the wire, huge inflated
    with pytest.raises(wire.WireError) as info:
        wire.decompress(bomb)
    assert info.value.status == 413
    assert info.value.code == "too_large"


def _gzip(raw):
    c = zlib.compressobj(5, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


@pytest.mark.parametrize("body,why", [
    (b"", "truncated"),
    (b"not gzip at all", "not gzip"),
    (b"{\"a\":1}", "not gzip"),
    (_gzip(b'{"a":1}')[:-5], "truncated"),
    (_gzip(b'{"a":1}') + b"x", "trailing"),
    (_gzip(b'{"a":1}') + _gzip(b'{"b":2}'), "trailing"),
    (_gzip(b'{"a":'), "not JSON"),
    (_gzip(b"\xff\xfe{}"), "not JSON"),
    (_gzip(b"[1, 2]"), "JSON object"),
    (_gzip(b'"text"'), "JSON object"),
    (_gzip(b"null"), "JSON object"),
])
def test_decompress_rejects_malformed_bodies(body, why):
    with pytest.raises(wire.WireError, match=why) as info:
        wire.decompress(body)
    assert info.value.status == 400
    assert info.value.code == "malformed"


# -- wire: sealed requests and responses -----------------------------------------------
MASTER = bytes.fromhex(KAT_MASTER)


def test_request_roundtrip_and_binding():
    obj = {"events": [{"x": 1}], "cursor": 7}
    blob, nonce = wire.seal_request(MASTER, KAT_KEY_ID, "push", obj)
    assert len(nonce) == 12 and crypto.peek(blob)[1] == nonce
    ts, got_nonce, got = wire.open_request(MASTER, KAT_KEY_ID, "push", blob)
    assert got == obj and got_nonce == nonce
    # the request is sealed under the c2s key with the documented context
    key = crypto.direction_key(MASTER, crypto.C2S)
    ctx = f"sk/{PROTOCOL_VERSION}|c2s|{KAT_KEY_ID}|push|".encode()
    assert wire.unpack(crypto.open_sealed(key, blob, ctx)[2]) == obj
    with pytest.raises(crypto.CryptoError):
        wire.open_request(MASTER, KAT_KEY_ID, "pull", blob)         # other endpoint
    with pytest.raises(crypto.CryptoError):
        wire.open_request(MASTER, "fedcba9876543210", "push", blob)  # other device
    with pytest.raises(crypto.CryptoError):
        wire.open_request(bytes(32), KAT_KEY_ID, "push", blob)       # wrong key


def test_response_is_bound_to_its_request_and_direction():
    _, nonce = wire.seal_request(MASTER, KAT_KEY_ID, "pull", {"after": 0})
    _, other_nonce = wire.seal_request(MASTER, KAT_KEY_ID, "pull", {"after": 0})
    assert nonce != other_nonce
    resp = wire.seal_response(MASTER, KAT_KEY_ID, "pull", nonce, {"events": [], "more": False})
    assert wire.open_response(MASTER, KAT_KEY_ID, "pull", nonce, resp) == {
        "events": [], "more": False}
    with pytest.raises(crypto.CryptoError):   # replayed as the answer to another request
        wire.open_response(MASTER, KAT_KEY_ID, "pull", other_nonce, resp)
    with pytest.raises(crypto.CryptoError):   # a response can never pass as a request
        wire.open_request(MASTER, KAT_KEY_ID, "pull", resp)
    with pytest.raises(crypto.CryptoError):
        wire.open_response(MASTER, KAT_KEY_ID, "push", nonce, resp)
    req, n2 = wire.seal_request(MASTER, KAT_KEY_ID, "pull", {"after": 0})
    with pytest.raises(crypto.CryptoError):   # nor a request as a response
        wire.open_response(MASTER, KAT_KEY_ID, "pull", n2, req)


def test_tampered_request_is_detected_at_every_byte():
    blob, _ = wire.seal_request(MASTER, KAT_KEY_ID, "push", {"events": ["a" * 10]})
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(crypto.CryptoError):
            wire.open_request(MASTER, KAT_KEY_ID, "push", bytes(bad))


# -- wrapped key material ------------------------------------------------------------
KAT_WRAP_HEX = ("01c8c9cacbcccdcecfd0d1d2d3315943f8a2e9dd075c153595322bc53bd0b6de9b305e9e13d59001"
                "dae6ac95d6e68f72620c3c122de0291b09345f8c25")


def test_wrapped_key_known_answer_and_independent_check():
    """version 0x01 | nonce(12) | AES-256-GCM(secret, master, ad="sk/1 wrap|<key_id>")."""
    secret, master, nonce = bytes(range(32)), bytes(range(32, 64)), bytes(range(200, 212))
    wrapped = crypto.wrap_key(secret, "0123456789abcdef", master, nonce=nonce)
    assert wrapped.hex() == KAT_WRAP_HEX
    assert crypto.unwrap_key(secret, "0123456789abcdef", wrapped) == master
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM   # another library
    assert AESGCM(secret).decrypt(wrapped[1:13], wrapped[13:],
                                  b"sk/1 wrap|0123456789abcdef") == master


def test_wrapped_key_tampering_truncation_and_wrong_context():
    secret = bytes(range(32))
    wrapped = bytes.fromhex(KAT_WRAP_HEX)
    for i in range(len(wrapped)):
        for bit in (0x01, 0x80):
            bad = bytearray(wrapped)
            bad[i] ^= bit
            with pytest.raises(crypto.CryptoError):
                crypto.unwrap_key(secret, "0123456789abcdef", bytes(bad))
    for n in range(len(wrapped)):
        with pytest.raises(crypto.FormatError):
            crypto.unwrap_key(secret, "0123456789abcdef", wrapped[:n])
    with pytest.raises(crypto.CryptoError, match="does not unwrap"):
        crypto.unwrap_key(secret, "fedcba9876543210", wrapped)
    with pytest.raises(crypto.CryptoError, match="does not unwrap"):
        crypto.unwrap_key(bytes(32), "0123456789abcdef", wrapped)
