"""Where things are and what they are set to: flag > environment > $SK_HOME/.env."""

import os
from pathlib import Path

from .errors import ConfigError

DEFAULT_HOME = "~/.spec-kitty"
DB_NAME = "sk.db"
ENV_NAME = ".env"
KEYS = ("SK_SERVER", "SK_API_KEY", "SK_NEVER_SYNC", "SK_PATH_MAP", "SK_TIMEOUT")


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
                self._file = {k: v for k, v in dotenv_values(self.env_path).items() if v is not None}
        return self._file

    def get(self, name, default=None):
        if name in self._overrides:
            return self._overrides[name]
        if os.environ.get(name):
            return os.environ[name]
        return self._file_values().get(name, default)

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
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL {url!r} must start with http:// or https://")
        return url

    @property
    def api_key(self):
        key = self.get("SK_API_KEY")
        if not key:
            raise ConfigError("no API key configured: run 'sk sync setup' or set SK_API_KEY")
        return key.strip()

    @property
    def timeout(self):
        try:
            return float(self.get("SK_TIMEOUT", "30"))
        except ValueError:
            raise ConfigError("SK_TIMEOUT must be a number of seconds") from None

    @property
    def never_sync_rules(self):
        return [r for r in (self.get("SK_NEVER_SYNC") or "").split(",") if r.strip()]

    @property
    def path_map(self):
        return parse_path_map((self.get("SK_PATH_MAP") or "").split(","))

    def write_env(self, updates):
        """Set `updates` in $SK_HOME/.env, keeping other lines; the file is mode 600."""
        self.home.mkdir(parents=True, exist_ok=True)
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
        self._file = None


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
