"""Errors that nrfm reports to the user as one line (the CLI prints them without a traceback).

Every error a user can cause derives from :class:`NrfmError`; its message names what is wrong and where
(file, row, column, key). Anything else escaping to the CLI is a bug in nrfm.
"""
from __future__ import annotations


class NrfmError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""


class ConfigError(NrfmError):
    """A configuration file or parameter is invalid (names the file and key)."""


class ManifestError(NrfmError):
    """A manifest is unreadable or invalid (names the file, row and column)."""


class DataError(NrfmError):
    """An image or label file is missing, unreadable or inconsistent (names the file)."""


class CheckpointError(NrfmError):
    """A checkpoint is corrupt, from another method/architecture, or from another config."""


class LeakageError(NrfmError):
    """A patient appears in two splits, or a statistic was fitted on held-out data."""


class TrainingError(NrfmError):
    """Training diverged (non-finite loss) or cannot proceed."""


class RunError(NrfmError):
    """A pipeline run failed or a run folder is unusable."""
