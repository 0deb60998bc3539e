"""Exceptions that mean "the user can fix this": the CLI prints them as one line and exits 2.

All are `UserError`s, exported from `metatransfer`. Those about a bad argument to the Python API are
also `ValueError` or `TypeError`, so code written against the standard exceptions catches them.
"""


class UserError(Exception):
    """A problem with the user's input (paths, data, config, arguments), not a bug."""


class DataError(UserError):
    """A dataset is missing, malformed or too small for the request; the message names the path."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an invalid value; the message names the key."""


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


class InputError(UserError, ValueError):
    """A value given to the Python API is wrong (a shape, a pixel range, a label count, a label)."""


class InputTypeError(UserError, TypeError):
    """A value given to the Python API has a type it does not accept (e.g. a bare image for a list)."""


class NotFittedError(UserError, ValueError, AttributeError):
    """A learner was asked to predict before `fit`; ValueError and AttributeError as in scikit-learn."""


class ModelFileError(UserError):
    """A model file is not one metatransfer can use; the message names the file and the problem."""


class ChecksumError(ModelFileError):
    """A shipped model's file does not have the sha256 its registry records (corrupt or replaced)."""


class UnknownModelError(UserError, ValueError):
    """A model name that is neither a shipped model nor an existing path; the message lists the names."""


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
