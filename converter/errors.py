"""The project's own exceptions. Each names the file and tensor it is about, so the CLI can
print one clear line and exit non-zero instead of a traceback."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


class MxconvError(Exception):
    """Base class: anything the user can fix by changing input, options or environment."""

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.message = message
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.file:  # a folder is named as one (a destination, a source checkpoint); never raises
            where.append(f"{'directory' if os.path.isdir(self.file) else 'file'} {self.file}")
        if self.tensor:
            where.append(f"tensor {self.tensor}")
        prefix = f"{', '.join(where)}: " if where else ""
        return prefix + self.message

    def in_file(self, file: str | Path) -> "MxconvError":
        """Name `file` as where this happened, unless a file is already named (numerics know the
        tensor but not which file it came from); returns self, for `raise e.in_file(...)`."""
        if self.file is None:
            self.file = str(file)
            self.args = (self.describe(),)
        return self


class SourceError(MxconvError):
    """The source checkpoint is unreadable, inconsistent or unsupported."""


class RecipeError(MxconvError):
    """A recipe YAML is malformed or asks for something impossible."""


class MappingError(MxconvError):
    """A name mapping is malformed or does not cover the source tensors."""


class NumericsError(MxconvError):
    """A tensor cannot be quantized as asked (non-finite values, bad shape)."""


class OutputError(MxconvError):
    """The destination cannot be written or is in a state we refuse to touch."""


class HubError(MxconvError):
    """Talking to the Hugging Face Hub failed."""


class VerifyError(MxconvError):
    """A verification could not run at all (as opposed to a check that failed)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a command after it had cleaned up; `message` says, in a few words,
    what is kept and how to go on (the CLI prints `mxconv: interrupted: MESSAGE` and exits 130).
    A KeyboardInterrupt, so code that catches that still does."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class MxconvWarning(UserWarning):
    """Something the user asked for but should hear about; the CLI prints `mxconv: warning: ...`."""


class NonFiniteWarning(MxconvWarning):
    """NaN/Inf values were quantized because --allow-nonfinite was given."""


@contextmanager
def interrupted_as(message: str | Callable[[], str]):
    """Turn Ctrl-C inside the block into `Interrupted(message)` (a callable is asked only then);
    an `Interrupted` raised deeper keeps its own, more precise message."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(message() if callable(message) else message) from None
