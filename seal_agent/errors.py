"""Errors a user can act on.

Anything raised as `SealError` is printed by the CLI as one clear line (no
traceback) and exits non-zero; everything else is a bug and keeps its traceback.
"""


class SealError(Exception):
    """A problem the user can fix: bad input, bad config, missing file."""


class ConfigError(SealError):
    """config.toml or a --set override is wrong."""


class PolicyError(SealError):
    """A policy file in policies/ is malformed."""


class DocumentError(SealError):
    """A document cannot be read or has no usable text."""


class TrainingDiverged(SealError):
    """The inner loop hit a NaN/inf loss; the update was abandoned."""
