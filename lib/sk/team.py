"""The team's members as a device sees them, and approvals (sk team)."""

from . import crypto
from .errors import UsageError
from .keyring import WaitingForKey, approval_record


def members(ring, client):
    """The team's devices: [{"device", "fingerprint", "epoch" (newest granted to its
    identity), "approved", "revoked", "self"}], after sharing the key."""
    state = ring.ensure(client, need=False)
    out = []
    for m in state["members"]:
        ident = bytes.fromhex(m["identity"]) if m["identity"] else None
        out.append({"device": m["device"],
                    "fingerprint": crypto.fingerprint(ident) if ident else None,
                    "epoch": max(m["granted"]) if m["granted"] else 0,
                    "approved": bool(ident and ring._approved(m, ident)),
                    "revoked": m["revoked"], "self": ident == ring.public})
    return out


def _member(state, name):
    for m in state["members"]:
        if m["device"] == name:
            if m["revoked"]:
                raise UsageError(f"device '{name}' is revoked")
            if not m["identity"]:
                raise UsageError(f"device '{name}' has no identity on the server yet: it must"
                                 " sync once with its key")
            return m, bytes.fromhex(m["identity"])
    raise UsageError(f"no device '{name}' in team '{state['team']}'")


def _approvals(ring, pairs):
    epoch, key = ring.current()
    return [{"device": m["device"], "identity": ident.hex(),
             "record": approval_record(key, ring.team, m["device"], ident).hex()}
            for m, ident in pairs]


def approve(ring, client, name, confirm):
    """Approve device `name` (confirm(its fingerprint, this device's) says yes) and
    share every epoch of the team key with it. False if not confirmed. (It may be
    the device that began the current epoch, after its key was rotated: its grants
    are taken once it is approved, so this needs only a key this device holds.)"""
    state = ring.ensure(client, need=False)
    if ring.current()[1] is None:
        raise WaitingForKey(state["team"], state["epoch"], state.get("device"),
                            bool(state.get("approval")))
    m, ident = _member(state, name)
    if not confirm(crypto.fingerprint(ident), crypto.fingerprint(ring.public)):
        return False
    client.call("keys", {"approvals": _approvals(ring, [(m, ident)])})
    ring.ensure(client)   # now eligible: its grants go out
    return True


def require_approval(ring, client):
    """Turn approval on for the team; the devices holding the key now are approved.
    Returns how many were."""
    state = ring.ensure(client)
    holders = []
    for m in state["members"]:
        if m["revoked"] or not m["identity"] or not m["granted"]:
            continue
        holders.append((m, bytes.fromhex(m["identity"])))
    client.call("keys", {"approval": True, "approvals": _approvals(ring, holders)})
    ring.store.set_meta(approval=1)
    ring.ensure(client)
    return len(holders)
