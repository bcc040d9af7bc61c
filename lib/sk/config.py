"""Where things are and what they are set to: flag > environment > $SK_HOME/.env."""

import os
from pathlib import Path

from .errors import ConfigError

DEFAULT_HOME = "~/.spec-kitty"
DB_NAME = "sk.db"
ENV_NAME = ".env"


class Config:
    def __init__(self, home=None, overrides=None):
        self.home = Path(os.path.expanduser(home or os.environ.get("SK_HOME") or DEFAULT_HOME))
        self.env_path = self.home / ENV_NAME
        self.db_path = self.home / DB_NAME
        self._overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self._file = None

    def _file_values(self):
        if self._file is None:
            self._file = {}
            if self.env_path.exists():
                from dotenv import dotenv_values
                try:
                    values = dotenv_values(self.env_path)
                except (OSError, UnicodeDecodeError) as e:
                    raise ConfigError(f"cannot read '{self.env_path}': {e}") from None
                self._file = {k: v for k, v in values.items() if v is not None}
        return self._file

    def get(self, name, default=None):
        if name in self._overrides:
            return self._overrides[name]
        if os.environ.get(name):
            return os.environ[name]
        return self._file_values().get(name, default)

    def in_file(self, name):
        """The value of `name` in $SK_HOME/.env itself (no flag, no environment)."""
        return self._file_values().get(name)

    def source(self, name):
        """Where `name` comes from: 'flag', 'environment', the .env path, or None."""
        if name in self._overrides:
            return "flag"
        if os.environ.get(name):
            return "environment"
        if name in self._file_values():
            return str(self.env_path)
        return None

    @property
    def server(self):
        url = self.get("SK_SERVER")
        if not url:
            raise ConfigError("no server configured: run 'sk sync setup' or set SK_SERVER")
        url = url.strip().rstrip("/")
        from urllib.parse import urlsplit
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ConfigError(f"server URL {url!r} is not valid: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"server URL {url!r} must look like http://HOST[:PORT]")
        if port == 0:
            raise ConfigError(f"server URL {url!r} has port 0")
        return url

    @property
    def api_key(self):
        key = self.get("SK_API_KEY")
        if not key:
            raise ConfigError("no API key configured: run 'sk sync setup' or set SK_API_KEY")
        return key.strip()

    @property
    def timeout(self):
        import math
        try:
            value = float(self.get("SK_TIMEOUT", "30"))
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError("SK_TIMEOUT must be a positive number of seconds")
        return value

    @property
    def shallow(self):
        """SK_SHALLOW=1: a fresh device begins at the newest snapshot and keeps no
        history before it (a CI job's environment)."""
        value = (self.get("SK_SHALLOW") or "").strip().lower()
        if value not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"SK_SHALLOW must be 1 or 0, not '{value}'")
        return value in ("1", "true", "yes")

    @property
    def actor(self):
        """SK_ACTOR: who makes the events appended here (a person, or an agent and the
        model that drove it), sealed with them."""
        return check_actor(self.get("SK_ACTOR"), "SK_ACTOR")

    @property
    def never_sync_rules(self):
        return [r for r in (self.get("SK_NEVER_SYNC") or "").split(",") if r.strip()]

    @property
    def path_map(self):
        return parse_path_map((self.get("SK_PATH_MAP") or "").split(","))

    def write_env(self, updates):
        """Set `updates` in $SK_HOME/.env, keeping other lines; the file is mode 600."""
        try:
            self._write_env(updates)
        except OSError as e:
            raise ConfigError(f"cannot write '{self.env_path}': {e.strerror or e}") from None
        self._file = None

    def _write_env(self, updates):
        make_home(self.home)
        lines, seen = [], set()
        if self.env_path.exists():
            for line in self.env_path.read_text().splitlines():
                name = line.split("=", 1)[0].strip().removeprefix("export ").strip()
                if name in updates:
                    if name not in seen:
                        lines.append(f"{name}={_quote(updates[name])}")
                        seen.add(name)
                    continue
                lines.append(line)
        lines += [f"{k}={_quote(v)}" for k, v in updates.items() if k not in seen]
        tmp = self.env_path.with_name(ENV_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.env_path)


def make_home(home):
    """Create $SK_HOME (mode 700) if missing; ConfigError if it cannot be."""
    home = Path(home)
    if home.exists() and not home.is_dir():
        raise ConfigError(f"SK_HOME '{home}' is not a directory")
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create SK_HOME '{home}': {e.strerror or e}") from None


def _quote(value):
    return "'" + str(value).replace("'", "") + "'"


def parse_path_map(items):
    """['FROM=TO', ...] -> [(FROM, TO)], longest FROM first."""
    pairs = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        src, sep, dst = item.partition("=")
        if not sep or not src:
            raise ConfigError(f"path map {item!r} must look like FROM=TO")
        pairs.append((src.rstrip("/") or "/", dst.rstrip("/") or "/"))
    return sorted(pairs, key=lambda p: -len(p[0]))


def check_actor(value, what):
    """An actor name as given (flag or environment), or None when empty; a
    ConfigError for one no reader could show on one line."""
    value = (value or "").strip()
    if not value:
        return None
    if len(value) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{what} must be one line of at most 200 characters")
    return value
