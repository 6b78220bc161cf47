"""The one error family moejax raises for what a user gave it: the message names what was wrong, where, and what to do.

`moejax` commands turn any MoejaxError into one line on stderr and exit status 2; exit status 1 is kept for a
check that ran and failed (a parity tolerance, a plan that does not fit).
"""

from __future__ import annotations


class MoejaxError(ValueError):
    """Input moejax cannot use (a file, a value, a setting): the message says what, where, and what to do."""


class ConfigError(MoejaxError):
    """A config.json this library cannot represent faithfully."""


class CheckpointError(MoejaxError):
    """A checkpoint file that is missing, corrupt, or does not match the model."""


class DataError(MoejaxError):
    """A corpus, data file, mixture, tokenizer or resume state that cannot be used."""


class MeshError(MoejaxError):
    """A device mesh that does not fit the devices or the model."""


class SettingsError(MoejaxError):
    """A command's setting (a flag) outside what it accepts."""


class RunError(MoejaxError):
    """A training run that cannot start or continue: another run in the directory, a non-finite loss."""


class OutputError(MoejaxError):
    """An output directory moejax will not write: it is not moejax's to replace."""
