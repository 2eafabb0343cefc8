"""Errors a user can cause, each with its own exit code.

The CLI prints ``str(error)`` as one line (plus ``hint`` when there is one) and exits with
``exit_code``. Anything that is not a ``RecgptError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import NoReturn


class RecgptError(Exception):
    """Base class: a known failure with a one-line message and a hint on what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(RecgptError):
    """Bad command-line input, a missing file or folder, or a bad --set override."""

    exit_code = 2


class RecipeError(RecgptError):
    """A recipe that does not parse or does not validate; the message names the dotted path."""

    exit_code = 3


class ModelError(RecgptError):
    """A checkpoint we refuse or cannot read: pickle weights, corrupt files, unknown architecture."""

    exit_code = 4


class UnsupportedError(RecgptError):
    """A valid request that the chosen target cannot do (e.g. weight-only int4 linear on XNNPACK)."""

    exit_code = 5


class MissingDependencyError(RecgptError):
    """An optional dependency (a target's runtime) is not installed; the hint names the extra."""

    exit_code = 6


class OutputError(RecgptError):
    """The output could not be written: the disk filled up, or the file system is read-only.
    Nothing is left behind (the artifact folder is written atomically)."""

    exit_code = 9


class ArtifactError(RecgptError):
    """An artifact folder that is missing files, has a bad manifest or fails its checksums.

    Exit code 2 like UsageError: for `verify`, a bad artifact is an input error (the contract
    is 0 pass, 1 a gate failed, 2 the input could not be checked)."""

    exit_code = 2


class StageError(RecgptError):
    """A pipeline stage failed for a reason we did not anticipate; wraps the original exception."""

    exit_code = 8

    def __init__(self, message: str, *, stage: str, target: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.stage = stage
        self.target = target


def require(module: str, extra: str):
    """Import an optional dependency or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # the message of the original says which submodule failed
        raise MissingDependencyError(
            f"{module} is not installed ({exc})",
            hint=f"pip install 'recgpt-export[{extra}]'",
        ) from exc


def invalid_field(path: str, message: str) -> NoReturn:
    """Refuse a recipe field: one line naming its dotted path."""
    raise RecipeError(f"{path}: {message}")
