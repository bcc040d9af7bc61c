"""Exceptions that carry the SPEC's exit codes; commands turn them into one line."""

OK, PARTIAL, USAGE, UNREACHABLE, AUTH, INTEGRITY = 0, 1, 2, 3, 4, 5


class SkError(Exception):
    """Base error: `exit_code` is what the command exits with."""

    exit_code = USAGE

    def __init__(self, message, exit_code=None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SkError):
    """Bad command-line input or bad local data given to a command (exit 2)."""

    exit_code = USAGE


class ConfigError(SkError):
    """Missing or invalid local configuration (exit 2)."""

    exit_code = USAGE


class Unreachable(SkError):
    """The server could not be reached or did not answer (exit 3)."""

    exit_code = UNREACHABLE


class AuthError(SkError):
    """The server refused this device's key: unknown, revoked or rotated (exit 4)."""

    exit_code = AUTH


class IntegrityError(SkError):
    """A response failed to decrypt or is malformed, or protocols disagree (exit 5)."""

    exit_code = INTEGRITY


class ServerError(SkError):
    """The server answered with an error that is not about auth or integrity."""

    exit_code = PARTIAL

    def __init__(self, message, status=None, code=None, exit_code=None, authenticated=False):
        super().__init__(message, exit_code)
        self.status = status
        self.code = code
        self.authenticated = authenticated   # sealed for this request: the server said it


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: the command stops where it is (each transaction
    it began rolls back) and exits 128 + the signal's number. `done`: what the
    run got done before it stopped, said in the last line."""

    def __init__(self, signum=2, done=None):
        super().__init__(self.describe(signum))
        self.signum, self.done = signum, done

    @staticmethod
    def describe(signum):
        import signal
        if signum == signal.SIGINT:
            return "interrupted"
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"stopped by {name}"
