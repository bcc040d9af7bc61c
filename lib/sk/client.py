"""Talk to an sk server: one sealed POST per call, errors mapped to exit codes."""

from . import PROTOCOL_VERSION, __version__, crypto, wire
from .errors import AuthError, ConfigError, IntegrityError, ServerError, Unreachable


class Client:
    def __init__(self, server, api_key, timeout=30.0):
        try:
            self.key_id, _ = crypto.parse_api_key(api_key)
        except ValueError as e:
            raise ConfigError(f"bad API key: {e}") from None
        self.master = crypto.derive_master(api_key)
        self.server = server.rstrip("/")
        self.timeout = timeout
        self._session = None

    def twin(self):
        """Another client for the same server and key, with its own connection, for
        a second thread (a requests session is not shared between threads)."""
        other = Client.__new__(Client)
        other.key_id, other.master, other.server, other.timeout = (
            self.key_id, self.master, self.server, self.timeout)
        other._session = None
        return other

    @property
    def session(self):
        if self._session is None:
            import requests
            self._session = requests.Session()
            self._session.headers.update({
                wire.PROTOCOL_HEADER: str(PROTOCOL_VERSION),
                wire.KEY_HEADER: self.key_id,
                "Content-Type": wire.CONTENT_TYPE,
                "User-Agent": f"sk/{__version__}",
            })
        return self._session

    def call(self, endpoint, body):
        """POST a sealed `body` to /api/<endpoint>; return the opened response object."""
        import requests
        url = f"{self.server}/api/{endpoint}"
        blob, nonce = wire.seal_request(self.master, self.key_id, endpoint, body)
        try:
            r = self.session.post(url, data=blob, timeout=(min(10, self.timeout), self.timeout))
        except requests.exceptions.Timeout:
            raise Unreachable(f"server '{self.server}' did not answer within {self.timeout:g} s") from None
        except requests.exceptions.RequestException as e:
            raise Unreachable(f"cannot reach server '{self.server}': {_reason(e)}") from None
        if r.status_code != 200:
            raise _error(r, self.server, endpoint)
        if r.headers.get("Content-Type", "").split(";")[0] != wire.CONTENT_TYPE:
            raise IntegrityError(f"'{url}' answered 200 with {r.headers.get('Content-Type') or 'no content type'},"
                                 " not a sealed sk response: is this an sk server?")
        try:
            return wire.open_response(self.master, self.key_id, endpoint, nonce, r.content)
        except crypto.CryptoError:
            raise IntegrityError(f"response from '{self.server}' failed authentication:"
                                 " altered in transit, or not from the server that holds this key") from None
        except wire.WireError as e:
            raise IntegrityError(f"malformed response from '{self.server}': {e}") from None

    def hello(self):
        return self.call("hello", {})

    def push(self, events):
        return self.call("push", {"events": events})

    def pull(self, after, limit, skip=None, known=None):
        body = {"after": after, "limit": limit}
        if skip is not None:
            body["skip"] = {"node_id": skip[0], "upto": skip[1]}
        if known is not None:
            body["known"] = known
        return self.call("pull", body)

    def close(self):
        if self._session is not None:
            self._session.close()


def _reason(exc):
    text = str(exc)
    for hint in ("Connection refused", "Name or service not known", "timed out",
                 "Connection reset", "Remote end closed", "No route to host"):
        if hint in text:
            return hint.lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _error(r, server, endpoint):
    """Turn a non-200 answer into the right exception, naming the HTTP status."""
    code, message, theirs = None, None, None
    try:
        answer = r.json()
        err = answer.get("error", {})
        code, message, theirs = err.get("code"), err.get("message"), answer.get("protocol")
    except (ValueError, AttributeError):
        pass
    what = f"server '{server}' answered HTTP {r.status_code}"
    detail = f": {message}" if message else (f" ({r.reason})" if r.reason else "")
    if r.status_code in (401, 403):
        return AuthError(f"key rejected: {message or r.reason}" if message
                         else f"{what}: key rejected")
    if code == "protocol_version":
        side = ("upgrade the sk server" if isinstance(theirs, int) and theirs < PROTOCOL_VERSION
                else "upgrade sk on this device")
        return IntegrityError(f"{message}; {side}")
    if r.status_code == 429:
        return Unreachable(f"{what}{detail}")
    if r.status_code == 413:
        return ServerError(f"{what} (too large){': ' + message if message else ''}",
                           status=413, code=code)
    if r.status_code in (502, 503, 504) or (r.status_code >= 500 and code):
        return Unreachable(what + detail)
    if code is None or r.status_code == 404:
        return IntegrityError(f"{what}{detail} for /api/{endpoint}: wrong URL, or not an sk server")
    return IntegrityError(what + detail)
