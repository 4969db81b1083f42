"""One exception hierarchy for the whole project.

Every message says what was expected, what was found, where, and what to do next.
The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``.
"""

from __future__ import annotations


class CrossportError(Exception):
    """Base of every error crossport raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}" if hint else message)


class ConfigError(CrossportError):
    """A flag, a config value or a combination of them is not valid."""

    exit_code = 2


class DataError(CrossportError):
    """A dataset cannot be found, downloaded or read."""


class TrainingError(CrossportError):
    """Training failed: it diverged, or a process of a distributed run died or could not start."""


class CheckpointError(CrossportError):
    """A checkpoint is missing, corrupt, unsafe or inconsistent."""


class ExportError(CrossportError):
    """The ONNX export failed or produced a model that does not check."""


class ImportModelError(CrossportError):
    """A model brought as an ONNX file is outside what crossport can take in, or cannot be normalized."""


class TranslationError(CrossportError):
    """The ONNX → TensorFlow translation failed."""


class PackageError(CrossportError):
    """The SavedModel or a TFLite file could not be built or does not load."""


class ParityError(CrossportError):
    """An artifact's outputs drifted from its reference beyond tolerance."""

    exit_code = 3

    def __init__(self, failures: list[str], *, detail: str | None = None, hint: str | None = None) -> None:
        self.failures = list(failures)
        self.detail = detail
        summary = f"parity failed in {len(failures)} check(s): " + "; ".join(failures)
        if detail:
            summary += f". {detail}"
        super().__init__(summary, hint=hint or "Nothing was published; see parity.json in the run directory.")


class ManifestError(CrossportError):
    """A run directory's manifest is missing, unreadable or does not match the files."""


class PublishError(CrossportError):
    """A version could not be published."""


class TrackingError(CrossportError):
    """The MLflow tracking store cannot be reached or written."""


def report(error: CrossportError, *, debug: bool = False) -> int:
    """How every crossport command ends on a ``CrossportError``: one line on stderr, its exit code.

    With ``debug`` the traceback is logged first.
    """
    import logging
    import sys

    if debug:
        logging.getLogger("crossport").error("failed", exc_info=error)
    sys.stderr.write(f"crossport: error: {error}\n")
    return error.exit_code
