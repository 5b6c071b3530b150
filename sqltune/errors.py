"""One exception root. Every failure a user can cause is a subclass with a message that names
the problem and the fix; the CLI prints it without a traceback and exits 2."""

from __future__ import annotations


class SqltuneError(Exception):
    """Root of every user-facing sqltune failure."""

    exit_code = 2

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


class DeployError(SqltuneError):
    """A deployment that cannot be rendered or a cloud step that failed."""
