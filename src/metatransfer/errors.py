"""Exceptions that mean "the user can fix this": the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (paths, data, config, arguments), not a bug."""


class DataError(UserError):
    """A dataset is missing, malformed or too small for the request; the message names the path."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an invalid value; the message names the key."""


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


class FileError(UserError, OSError):
    """Reading or writing one of our files failed (disk full, read-only, not a folder, a loop, ...).

    Also an OSError with the original `errno`, so callers that handle OSError keep working.
    """


def file_error(exc: OSError, path: object, action: str) -> FileError:
    """A one-line FileError for `exc` that names `path` and what we were doing (`action`: "write", "read")."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    err = FileError(f"cannot {action} {path}: {reason}")
    err.errno = exc.errno
    return err
