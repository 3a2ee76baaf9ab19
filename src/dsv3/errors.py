"""The errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class DsV3Error(Exception):
    """Base class: a user-facing error whose message is the whole story."""


class ConfigError(DsV3Error, ValueError):
    """A config field is missing, of the wrong type, or inconsistent with another field."""


class CheckpointError(DsV3Error):
    """A checkpoint is missing, incomplete, or does not match the model."""


class RequestError(DsV3Error, ValueError):
    """A generation request (prompt, sampling options) is invalid."""
