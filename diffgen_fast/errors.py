"""Exceptions raised by diffgen-fast.

Every error names the argument at fault and what was expected. The classes subclass the built-in exception a
caller would catch anyway (ValueError, TypeError, RuntimeError), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DiffgenError(Exception):
    """Base class of every diffgen-fast error."""


class InputError(DiffgenError, ValueError):
    """An argument has the wrong shape, value range, or contains NaN/Inf."""


class InputTypeError(DiffgenError, TypeError):
    """An argument has the wrong type or dtype."""


class BackendUnavailableError(DiffgenError, RuntimeError):
    """A backend that was asked for by name cannot run here (not built, no GPU, unsupported dtype, ...)."""


class DataFormatError(DiffgenError, ValueError):
    """A file is unreadable, corrupt, in an unknown format, or unsafe to load."""


class StaleIndexError(DiffgenError, ValueError):
    """A saved index was built for another training set (its fingerprint does not match)."""
