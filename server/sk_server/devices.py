"""Device registration on the server host: what sk-register calls."""

import re

from sk import crypto

from .store import StoreError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def _check_name(what, value):
    if not NAME_RE.match(value or ""):
        raise StoreError(f"{what} {value!r} must be 1-64 chars of letters, digits, _ . @ -,"
                         " starting with a letter or digit")


def _identity(api_key):
    """The public half of the identity the key's holder derives (crypto): what the
    team's members seal the team key to. The private half is computed here only to
    take its public half, and kept nowhere."""
    return crypto.identity_public(crypto.identity_secret(api_key))


def register(store, name, team="default"):
    """Create device `name` in `team`; return its new API key (shown once). The
    server keeps key material derived from it and its identity's public half."""
    _check_name("device name", name)
    _check_name("team name", team)
    key_id, api_key = crypto.new_api_key()
    store.create_device(name, team, key_id, crypto.derive_master(api_key), _identity(api_key))
    return api_key


def rotate(store, name):
    """Give device `name` a new key; the old one is refused from now on, and the
    team's next write waits for a new key epoch."""
    key_id, api_key = crypto.new_api_key()
    store.rotate_key(name, key_id, crypto.derive_master(api_key), _identity(api_key))
    return api_key


def revoke(store, name):
    store.revoke_device(name)
