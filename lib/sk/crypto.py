"""All of sk's cryptography: key format, derive, seal, open; identities and team
keys (protocol 2, end-to-end).

API key      ``sk1.<key_id>.<secret>``; key_id is 16 hex digits (it names the key on
             the wire), secret is 32 random bytes, base64url without padding.
master       HKDF-SHA256(secret, salt=key_id, info="sk/1 master"): what the server
             stores instead of the key.
direction    HKDF-SHA256(master, info="sk/1 c2s" or "sk/1 s2c"): one AES-256 key per
             direction, so a response can never be replayed as a request.
sealed blob  version(1)=0x01 | timestamp ms(8, big-endian) | nonce(12) | ciphertext | tag(16)
             AES-256-GCM; associated data = the 21-byte header + the caller's context
             (device, endpoint, ...), so the timestamp and nonce are authenticated too.

End to end (the server never holds these):
identity     X25519 private key = HKDF-SHA256(secret, salt=key_id, info="sk/2 identity");
             its public half is what the server keeps of it (the server's master is
             another HKDF output of the same secret, from which this one cannot be had).
team key     32 random bytes per team and key epoch, made by a member device.
grant        a team key sealed to one device: version(1)=0x02 | ephemeral public(32) |
             AES-256-GCM(k, nonce=0, ad="sk/2 grant", team key) (48); k = HKDF-SHA256(
             X25519(ephemeral, recipient) || X25519(granter, recipient), salt=ephemeral
             public || recipient public || granter public, info="sk/2 grant|<team>|<epoch>"),
             so it opens only for the recipient and only if the granter's static key made it.
data key     HKDF-SHA256(team key, info="sk/2 <purpose>|<team>"), purpose "events" or
             "snapshot": a sealed body cannot move to another team or purpose.
data blob    version(1)=0x02 | nonce(12) | AES-256-GCM(data key, ad) (see sk.sealed).
"""

import base64
import hmac
import os
import re
import struct
import time

VERSION = 1
HEADER = struct.Struct(">BQ12s")  # version, timestamp ms, nonce
TAG_LEN = 16
C2S, S2C = "c2s", "s2c"
_KEY_RE = re.compile(r"^sk1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")


class CryptoError(Exception):
    """Authentication failed: wrong key, or the message was altered."""


class FormatError(CryptoError):
    """Not a sealed message of a version this code knows."""


def new_api_key():
    """Return (key_id, api_key) for a new device key."""
    key_id = os.urandom(8).hex()
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    return key_id, f"sk1.{key_id}.{secret}"


def parse_api_key(api_key):
    """Return (key_id, secret bytes); ValueError if it is not an sk API key."""
    m = _KEY_RE.match(api_key.strip()) if isinstance(api_key, str) else None
    if not m:
        raise ValueError("not an sk API key (expected sk1.<16 hex>.<43 base64url chars>)")
    return m.group(1), base64.urlsafe_b64decode(m.group(2) + "=")


def _hkdf(secret, salt, info):
    from Cryptodome.Hash import SHA256
    from Cryptodome.Protocol.KDF import HKDF
    return HKDF(secret, 32, salt, SHA256, context=info)


def derive_master(api_key):
    key_id, secret = parse_api_key(api_key)
    return _hkdf(secret, key_id.encode(), b"sk/1 master")


def direction_key(master, direction):
    if direction not in (C2S, S2C):
        raise ValueError("direction must be c2s or s2c")
    return _hkdf(master, b"", b"sk/1 " + direction.encode())


def _gcm_seal(key, nonce, aad, plaintext):
    """AES-256-GCM: ciphertext + 16-byte tag of plaintext, authenticating aad. The
    one place every sealed format of sk is encrypted."""
    from Cryptodome.Cipher import AES
    if len(nonce) != 12:
        raise ValueError("nonce must be 12 bytes")
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_LEN)
    cipher.update(aad)
    ct, tag = cipher.encrypt_and_digest(plaintext)
    return ct + tag


def _gcm_open(key, nonce, aad, sealed, what="message"):
    """The plaintext of _gcm_seal's output; CryptoError if it does not authenticate."""
    from Cryptodome.Cipher import AES
    if len(sealed) < TAG_LEN:
        raise FormatError(f"sealed {what} too short ({len(sealed)} bytes)")
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_LEN)
    cipher.update(aad)
    try:
        return cipher.decrypt_and_verify(sealed[:-TAG_LEN], sealed[-TAG_LEN:])
    except ValueError:
        raise CryptoError(f"{what} failed authentication (wrong key or altered)") from None


def seal(key, plaintext, context, timestamp_ms=None, nonce=None):
    """Encrypt and authenticate `plaintext`, binding `context` (bytes)."""
    if timestamp_ms is None:
        timestamp_ms = int(time.time() * 1000)
    if nonce is None:
        nonce = os.urandom(12)
    header = HEADER.pack(VERSION, timestamp_ms, nonce)
    return header + _gcm_seal(key, nonce, header + context, plaintext)


def peek(blob):
    """Return (timestamp_ms, nonce) from a sealed blob's header without opening it."""
    if len(blob) < HEADER.size + TAG_LEN:
        raise FormatError(f"sealed message too short ({len(blob)} bytes)")
    version, ts, nonce = HEADER.unpack_from(blob)
    if version != VERSION:
        raise FormatError(f"sealed message version {version}, this sk reads version {VERSION}")
    return ts, nonce


def open_sealed(key, blob, context):
    """Return (timestamp_ms, nonce, plaintext); CryptoError if it fails to authenticate."""
    ts, nonce = peek(blob)
    header = blob[:HEADER.size]
    return ts, nonce, _gcm_open(key, nonce, header + context, blob[HEADER.size:])


def same(a, b):
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(a, b)


# -- key material at rest (server side) ------------------------------------------
# A device's master is stored wrapped under the server secret, so a copied
# database alone cannot impersonate a device:
#   wrapped = 0x01 | nonce(12) | AES-256-GCM(secret, master, ad="sk/1 wrap|<key_id>") | tag(16)
WRAP_VERSION = 1


def wrap_key(secret, key_id, master, nonce=None):
    nonce = os.urandom(12) if nonce is None else nonce
    return bytes([WRAP_VERSION]) + nonce + _gcm_seal(secret, nonce, b"sk/1 wrap|" + key_id.encode(),
                                                     master)


def unwrap_key(secret, key_id, wrapped):
    """The master inside `wrapped`; CryptoError if the secret (or key_id) is wrong."""
    wrapped = bytes(wrapped)
    if len(wrapped) != 1 + 12 + 32 + TAG_LEN or wrapped[0] != WRAP_VERSION:
        raise FormatError("stored key material is not wrapped key material of version 1")
    try:
        return _gcm_open(secret, wrapped[1:13], b"sk/1 wrap|" + key_id.encode(), wrapped[13:])
    except FormatError:
        raise
    except CryptoError:
        raise CryptoError("key material does not unwrap with this server secret") from None


# -- identities ----------------------------------------------------------------------
def identity_secret(api_key):
    """This device's X25519 private key (32 bytes), derived from its API key."""
    key_id, secret = parse_api_key(api_key)
    return _hkdf(secret, key_id.encode(), b"sk/2 identity")


def identity_public(private):
    from Cryptodome.Protocol.DH import import_x25519_private_key
    return import_x25519_private_key(private).public_key().export_key(format="raw")


def fingerprint(public):
    """A public key's fingerprint for people to compare: 20 hex digits in groups."""
    import hashlib
    h = hashlib.sha256(b"sk/2 fingerprint|" + bytes(public)).hexdigest()[:20]
    return " ".join(h[i:i + 4] for i in range(0, 20, 4))


def _x25519(private, public):
    from Cryptodome.Protocol.DH import (import_x25519_private_key, import_x25519_public_key,
                                        key_agreement)
    try:
        return key_agreement(static_priv=import_x25519_private_key(private),
                             static_pub=import_x25519_public_key(bytes(public)),
                             kdf=lambda shared: shared)
    except ValueError as e:
        raise CryptoError(f"not an X25519 public key: {e}") from None


# -- team keys and grants --------------------------------------------------------------
GRANT_VERSION = 2
GRANT_LEN = 1 + 32 + 32 + TAG_LEN


def new_team_key():
    return os.urandom(32)


def _grant_key(shared, eph_pub, recipient_pub, granter_pub, team, epoch):
    return _hkdf(shared, bytes(eph_pub) + bytes(recipient_pub) + bytes(granter_pub),
                 f"sk/2 grant|{team}|{int(epoch)}".encode())


def seal_grant(team, epoch, team_key, granter_private, recipient_public, ephemeral=None):
    """The team key of (team, epoch) sealed to one recipient by one granter."""
    eph = os.urandom(32) if ephemeral is None else ephemeral
    eph_pub = identity_public(eph)
    granter_pub = identity_public(granter_private)
    shared = _x25519(eph, recipient_public) + _x25519(granter_private, recipient_public)
    k = _grant_key(shared, eph_pub, recipient_public, granter_pub, team, epoch)
    return bytes([GRANT_VERSION]) + eph_pub + _gcm_seal(k, bytes(12), b"sk/2 grant", team_key)


def open_grant(team, epoch, grant, recipient_private, granter_public):
    """The team key inside a grant; CryptoError unless it was sealed to this
    recipient, for this team and epoch, by the holder of granter_public."""
    grant = bytes(grant)
    if len(grant) != GRANT_LEN or grant[0] != GRANT_VERSION:
        raise FormatError("not a team key grant of version 2")
    eph_pub = grant[1:33]
    recipient_pub = identity_public(recipient_private)
    shared = _x25519(recipient_private, eph_pub) + _x25519(recipient_private, granter_public)
    k = _grant_key(shared, eph_pub, recipient_pub, granter_public, team, epoch)
    return _gcm_open(k, bytes(12), b"sk/2 grant", grant[33:], "team key grant")


# -- data: what the server stores and cannot read ------------------------------------------
DATA_VERSION = 2


def data_key(team_key, team, purpose):
    return _hkdf(team_key, b"", f"sk/2 {purpose}|{team}".encode())


def seal_data(key, plaintext, aad, nonce=None):
    nonce = os.urandom(12) if nonce is None else nonce
    return bytes([DATA_VERSION]) + nonce + _gcm_seal(key, nonce, aad, plaintext)


def open_data(key, blob, aad, what="sealed data"):
    blob = bytes(blob)
    if len(blob) < 1 + 12 + TAG_LEN or blob[0] != DATA_VERSION:
        raise FormatError(f"{what} is not sealed data of version 2")
    return _gcm_open(key, blob[1:13], aad, blob[13:], what)

