"""One exception root. Every failure a user can cause is a subclass with a message that names
the problem and the fix; the CLI prints it without a traceback and exits 2."""

from __future__ import annotations

import errno


class SqltuneError(Exception):
    """Root of every user-facing sqltune failure."""

    exit_code = 2
    label = "error"  # what the CLI prints before the message

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ConfigError(SqltuneError):
    """A config key, flag or environment value that cannot be used."""


class DataError(SqltuneError):
    """A dataset that cannot be loaded or has no usable rows."""


class ModelError(SqltuneError):
    """A model that cannot be loaded, trained or merged."""


class ArtifactError(SqltuneError):
    """A model folder or bucket version that is incomplete, corrupt or missing."""


class TrainingInterrupted(SqltuneError):
    """The job was asked to stop (SIGTERM) and saved a checkpoint first."""

    exit_code = 143


class AttemptEnded(SqltuneError):
    """This attempt's time budget is spent before the planned end: a checkpoint is saved and the next
    attempt resumes from it. Not a failure: the exit code asks the platform for that next attempt."""

    # EX_TEMPFAIL of sysexits.h ("a temporary failure; the user is invited to retry"): distinct from
    # 1 (a crash), 2 (bad input) and 143 (SIGTERM), and non-zero so Cloud Run and Kubernetes retry.
    exit_code = 75
    label = "more to do"


class DeployError(SqltuneError):
    """A deployment that cannot be rendered or a cloud step that failed."""


def disk_full(exc: BaseException) -> bool:
    """A full disk, as the OS reports it, or as safetensors does (its own error type, the OS error in the text)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in str(exc)


DISK_FULL_FIX = ("free space on that disk and rerun with the same --output: the checkpoints are kept, and the "
                 "rerun resumes from the last complete one (a half-written one is skipped)")
