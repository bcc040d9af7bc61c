"""All of sk's cryptography: key format, derive, seal, open.

API key      ``sk1.<key_id>.<secret>``; key_id is 16 hex digits (it names the key on
             the wire), secret is 32 random bytes, base64url without padding.
master       HKDF-SHA256(secret, salt=key_id, info="sk/1 master"): what the server
             stores instead of the key.
direction    HKDF-SHA256(master, info="sk/1 c2s" or "sk/1 s2c"): one AES-256 key per
             direction, so a response can never be replayed as a request.
sealed blob  version(1)=0x01 | timestamp ms(8, big-endian) | nonce(12) | ciphertext | tag(16)
             AES-256-GCM; associated data = the 21-byte header + the caller's context
             (device, endpoint, ...), so the timestamp and nonce are authenticated too.
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
