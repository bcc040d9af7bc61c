"""The server secret: 32 random bytes that wrap every device's key material in the
database (see sk.crypto.wrap_key). It never goes into the database.

Where it comes from, first match wins: SK_SERVER_SECRET (the value, base64url);
the file named by SK_SERVER_SECRET_FILE; the file beside a SQLite database
(server.db -> server.secret). The file is created on first start with mode 600;
several servers on one database share it by pointing at the same file or value.
"""

import base64
import os
import stat


class SecretError(Exception):
    pass


def _decode(text, where):
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SecretError(f"server secret in {where} must be 32 bytes, base64url")
    return raw


def beside(db):
    """The secret file beside SQLite database file `db` (server.db -> server.secret)."""
    return os.path.splitext(os.path.abspath(os.fspath(db)))[0] + ".secret"


def secret_path(db):
    if os.environ.get("SK_SERVER_SECRET_FILE"):
        return os.path.expanduser(os.environ["SK_SERVER_SECRET_FILE"])
    if "://" in os.fspath(db):
        raise SecretError("set SK_SERVER_SECRET or SK_SERVER_SECRET_FILE for a database URL")
    return beside(db)


def where(db):
    """Where the secret for database `db` comes from, for messages."""
    if os.environ.get("SK_SERVER_SECRET"):
        return "SK_SERVER_SECRET"
    try:
        return secret_path(db)
    except SecretError:
        return "SK_SERVER_SECRET_FILE"


def load_secret(db, create=True):
    """The 32-byte secret for database `db`, creating its file if allowed."""
    if os.environ.get("SK_SERVER_SECRET"):
        return _decode(os.environ["SK_SERVER_SECRET"], "SK_SERVER_SECRET")
    path = secret_path(db)
    if create and not os.path.exists(path):
        _create(path)
    return read_secret(path)


def _create(path):
    """Write a new secret to `path` whole or not at all: written to a private file
    first, then linked into place, so a server starting at the same moment never
    reads a half-written one, and of two, the first one's wins."""
    text = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(text + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    except OSError as e:
        raise SecretError(f"cannot create server secret '{path}': {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def read_secret(path):
    """The 32-byte secret in file `path` (refused if others can read it)."""
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"server secret '{path}' is readable by others; chmod 600 it")
        with open(path) as f:
            return _decode(f.read(), f"'{path}'")
    except FileNotFoundError:
        raise SecretError(f"no server secret at '{path}': the database's key material"
                          " cannot be used without it (set SK_SERVER_SECRET_FILE)") from None
    except OSError as e:
        raise SecretError(f"cannot read server secret '{path}': {e.strerror or e}") from None
