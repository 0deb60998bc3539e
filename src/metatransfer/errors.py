"""Exceptions that mean "the user can fix this": the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (paths, data, config, arguments), not a bug."""


class DataError(UserError):
    """A dataset is missing, malformed or too small for the request; the message names the path."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an invalid value; the message names the key."""


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""
