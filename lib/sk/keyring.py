"""The team key on a device: the epochs it holds, how it gets them (a grant sealed
to its identity by another member) and how it shares them (grants it seals for
members that lack them), so that a device needs only its URL and API key.

Every network run begins with `ensure()`: one sealed request (POST /api/keys) that
returns the team key's state. The device opens the grants sealed to it, starts
epoch 1 if its team has no key yet, starts the next epoch if a device was revoked
or rotated (rekey), and seals for each member the epochs it lacks, the whole
history included. Until it holds the current epoch it cannot push or read: it
says so and exits 1 (WaitingForKey).

Teams that do not trust the server host require approval: then a member shares
the key only with devices a member approved (`sk team approve NAME`, which shows
both fingerprints), an approval being a MAC under the team key, which the server
cannot make. A device that has seen approval required never accepts it turned off.
"""

import hashlib
import hmac

from . import crypto
from .errors import IntegrityError, SkError


class WaitingForKey(SkError):
    """This device holds no key of its team's current epoch yet (exit 1)."""

    exit_code = 1

    def __init__(self, team, epoch, device=None, approval=False, unapproved=None):
        how = (f"run 'sk team approve {device}' on any device that has it" if approval
               else "run 'sk sync' on any device that has it")
        if unapproved:   # e.g. a member whose key was rotated began the epoch
            how = (f"its key came from '{unapproved}', which no member has approved: if that"
                   f" device is yours, run 'sk team approve {unapproved}'")
        super().__init__(f"waiting for a member of team '{team}' to share the team key"
                         f"{f' (epoch {epoch})' if epoch > 1 else ''}; {how}")
        self.team, self.epoch = team, epoch


def check_state(state):
    """The server's key state (POST /api/keys) if it has the shape a device reads,
    else IntegrityError: what a server sends, sealed or not, never crashes a device."""
    def count(v):
        return type(v) is int and 0 <= v < 2 ** 63

    def text(v, empty=False):
        return isinstance(v, str) and (empty or v != "")

    def hexes(v):
        return v is None or (isinstance(v, str) and len(v) % 2 == 0
                             and all(c in "0123456789abcdef" for c in v))

    try:
        ok = (isinstance(state, dict) and text(state.get("team")) and text(state.get("device"))
              and count(state.get("epoch")) and hexes(state.get("identity"))
              and all(count(e) for e in state.get("holds", []))
              and all(isinstance(e, dict) and count(e.get("epoch"))
                      for e in state.get("epochs", []))
              and all(isinstance(g, dict) and count(g.get("epoch")) and text(g.get("sealed"))
                      and text(g.get("granter")) and text(g.get("granted_by"), True)
                      for g in state.get("grants", []))
              and isinstance(state.get("members", []), list)
              and all(isinstance(m, dict) and text(m.get("device")) and hexes(m.get("identity"))
                      and hexes(m.get("approval")) and isinstance(m.get("granted"), list)
                      and all(count(e) for e in m["granted"])
                      for m in state.get("members", [])))
    except TypeError:   # a list that is not one
        ok = False
    if not ok:
        raise IntegrityError("malformed key state from the server")
    state.setdefault("members", [])
    return state


def approval_record(team_key, team, device, identity):
    """A member's approval of a device's identity: HMAC-SHA256 under a key derived
    from the team key, which the server does not have."""
    key = crypto.data_key(team_key, team, "approval")
    return hmac.new(key, f"approve|{team}|{device}|".encode() + bytes(identity),
                    hashlib.sha256).digest()


class Keyring:
    """The team keys this device holds, in its local store (table team_keys)."""

    def __init__(self, store, api_key):
        self.store = store
        store.key_id = crypto.parse_api_key(api_key)[0]   # the team is the key's
        self.private = crypto.identity_secret(api_key)
        self.public = crypto.identity_public(self.private)
        self.team = store.meta("team")
        self._keys = None
        self.unvouched = {}   # epoch -> the unapproved device whose grant of it was left

    def keys(self):
        if self._keys is None:
            self._keys = dict(self.store.team_keys(self.team)) if self.team else {}
        return self._keys

    def get(self, epoch):
        return self.keys().get(epoch)

    def starts(self):
        """{epoch: the seq at which it began}, as this device first learned it."""
        if getattr(self, "_starts", None) is None:
            import json
            self._starts = {int(k): v for k, v in json.loads(
                self.store.meta("epoch_starts") or "{}").items()}
        return self._starts

    def current(self):
        """(epoch, key) of the newest epoch held, or (0, None)."""
        keys = self.keys()
        if not keys:
            return 0, None
        epoch = max(keys)
        return epoch, keys[epoch]

    def add(self, epoch, key, granted_by):
        self.store.add_team_key(self.team, epoch, key, granted_by)
        self.keys()[epoch] = key

    # -- the key step of every network run ----------------------------------------------
    def ensure(self, client, need=True):
        """Bring this device's team keys up to date with the server and share them;
        returns the key state. WaitingForKey (if need) when the current epoch is
        not held."""
        state = check_state(client.call("keys", {"identity": self.public.hex()}))
        for _ in range(4):
            state = self._take(state)
            body, pending = self._duties(state)
            if not body:
                break
            state = check_state(client.call("keys", body))
            if pending and not state.get("refused") and state["epoch"] == pending[0]:
                self.add(*pending, "this device")
            # refused: another member began that epoch first; the next turn takes theirs
        if need and not self.usable(state, state["epoch"]):
            raise WaitingForKey(state["team"], state["epoch"], state.get("device"),
                                bool(state.get("approval")), self.unvouched.get(state["epoch"]))
        return state

    def _take(self, state):
        """Note the team, check the approval pin and our identity, open our grants."""
        if state.get("team") != self.team:
            self.store.switch_team(state["team"])
            self.team, self._keys = state["team"], None
        elif self.store.meta("team_key") is None:   # a home from before the key was noted
            self.store.set_meta(team_key=self.store.key_id)
        name = state.get("device")
        if isinstance(name, str) and name and self.store.meta("device") != name:
            self.store.set_meta(device=name)   # written into what it stamps (blame)
        if state.get("identity") not in (None, self.public.hex()):
            raise IntegrityError("the server holds another identity for this device than its"
                                 " key's: it is not the server this key was registered on, or"
                                 " it was tampered with")
        if self.store.meta("approval") == "1" and not state.get("approval"):
            raise IntegrityError(f"team '{self.team}' requires approval, but the server says it"
                                 " does not: refusing to share the team key")
        if state.get("approval"):
            self.store.set_meta(approval=1)
        vetted = state.get("approval") and self.keys()
        for g in state.get("grants", []):
            if self.get(g["epoch"]) is not None:
                continue
            if vetted and not self._vouched(state, g):
                self.unvouched[g["epoch"]] = g.get("granted_by")
                continue   # where approval is required, only an approved member's grant
            try:
                key = crypto.open_grant(self.team, g["epoch"], bytes.fromhex(g["sealed"]),
                                        self.private, bytes.fromhex(g["granter"]))
            except (crypto.CryptoError, ValueError):
                continue   # not for this identity, or forged: worthless either way
            self.add(g["epoch"], key, g["granted_by"])
        # each epoch's start, pinned as first seen once this device holds its key (so
        # the server cannot move it later, nor make up an epoch that ends the one before)
        starts = self.starts()
        seen = {e["epoch"]: e["start_seq"] for e in state.get("epochs", [])   # (checked)
                if type(e.get("start_seq")) is int and e["epoch"] <= state["epoch"]
                and self.get(e["epoch"]) is not None}
        if any(e not in starts for e in seen):
            import json
            self.store.set_meta(epoch_starts=json.dumps({**{str(k): v for k, v in seen.items()},
                                                        **{str(k): v for k, v in starts.items()}}))
            self._starts = None
        return state

    def need(self, client, epoch, where=""):
        """The key of `epoch`, which a page needs (sk.protocol.NeedKey): fetched, as a
        member's grant may be waiting; else WaitingForKey (exit 1), or IntegrityError
        when the team has no such epoch yet (no member sealed that batch)."""
        state = self.ensure(client)
        key = self.get(epoch)
        if key is None and epoch > state["epoch"]:
            raise IntegrityError(f"{where or 'a batch'} is sealed under key epoch {epoch}, past"
                                 f" the team's current epoch {state['epoch']}: altered on the"
                                 " server; nothing of the page was applied")
        if key is None:
            raise WaitingForKey(self.team, epoch)
        return key

    def usable(self, state, epoch):
        """Whether this device holds `epoch`'s key and the server knows a member gave it
        (`holds`): only then does the server take what it seals under it. A copied
        home given a new device's key holds keys no member has given that device."""
        return self.get(epoch) is not None and epoch in state.get("holds", [epoch])

    def eligible(self, state):
        """The members this device shares the team key with: not revoked, with an
        identity, and (where approval is required) approved by a member."""
        out = []
        for m in state["members"]:
            if m["revoked"] or not m["identity"]:
                continue
            ident = bytes.fromhex(m["identity"])
            if state.get("approval") and ident != self.public and not self._approved(m, ident):
                continue
            out.append((m, ident))
        return out

    def _vouched(self, state, grant):
        """Whether a grant comes from this device or from a member approved under a key
        it holds: a server can register a device of its own and seal grants from it,
        which a team requiring approval must not take. (A device holding no key yet
        cannot tell: it takes the first grant it gets.)"""
        try:
            granter = bytes.fromhex(grant["granter"])
        except (TypeError, ValueError):
            return False
        if granter == self.public:
            return True
        return any(m["device"] == grant.get("granted_by") and m["identity"] == granter.hex()
                   and not m["revoked"] and self._approved(m, granter)
                   for m in state.get("members", []))

    def _approved(self, member, identity):
        record = member.get("approval")
        if not record:
            return False
        return any(hmac.compare_digest(bytes.fromhex(record),
                                       approval_record(key, self.team, member["device"], identity))
                   for key in self.keys().values())

    def _duties(self, state):
        """What this device must send, and the epoch it begins (epoch, key) or None:
        epoch 1 for a team with no key, the next epoch after a revocation or
        rotation, and grants for each member (itself too: another home with its key
        reads through them) of the epochs it holds and the member lacks.
        ({}, None) when there is nothing to do."""
        epoch = state["epoch"]
        pending = None
        if epoch == 0 or (state.get("rekey") and self.usable(state, epoch)):
            pending = (epoch + 1, crypto.new_team_key())
        held = {e: k for e, k in self.keys().items() if self.usable(state, e)}
        if pending:
            held[pending[0]] = pending[1]
        grants = []
        for m, ident in self.eligible(state):
            for e in sorted(set(held) - set(m["granted"])):
                grants.append({"epoch": e, "device": m["device"], "recipient": ident.hex(),
                               "sealed": crypto.seal_grant(self.team, e, held[e], self.private,
                                                           ident).hex()})
        if pending is None and not grants:
            return {}, None
        body = {"grants": grants}
        if pending:
            body["epoch"] = pending[0]
        return body, pending
