"""The errors a user can fix: each message is one line that names the fix.

Every layer may import this module (it imports nothing of the package). The command line
catches `UserError` once and prints its message without a traceback; anything else is a bug.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a fault the user can act on; the message is one line naming the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class NoCheckpointError(UserError, FileNotFoundError):
    """The workdir holds no (readable, or requested) checkpoint."""


class DatasetNotPreparedError(UserError, ValueError):
    """The dataset's ArrayRecord files are not in the data dir (the message says how to fix)."""


class MissingEvalInputError(UserError, FileNotFoundError):
    """Feature-network weights or reference statistics the eval needs are not on disk."""


class ReferenceStatsError(UserError, ValueError):
    """Reference statistics are missing, corrupted or made otherwise (message names the fix)."""


class UnsafePathError(UserError, ValueError):
    """A write or delete would land outside its directory (a symlink leading out of the
    workdir), or would remove files this program did not write; nothing was touched."""


class CheckpointSaveError(UserError, RuntimeError):
    """Writing a checkpoint failed (disk full, permissions); training stopped."""


class CorruptCheckpointError(UserError, RuntimeError):
    """No checkpoint in the workdir could be read back."""


class NonFiniteError(UserError, RuntimeError):
    """Training produced non-finite values for too many consecutive steps, or sampling produced
    NaN/Inf images (which would be written as black)."""


class WorkdirLockedError(UserError, RuntimeError):
    """Another process is writing to the workdir (training it, or making the same eval)."""
