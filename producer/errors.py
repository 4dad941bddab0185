"""The producer's errors: one small family, each saying what to do about it."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ProducerError(RuntimeError):
    """Base of the producer's own errors."""


class BackpressureError(ProducerError):
    """Pending (snapshotted, not yet stored) data passed `max_pending_bytes` and the
    configured policy is `raise`. Nothing was dropped: the signs stay buffered."""


class UnstoredDataError(ProducerError):
    """`close()` ran out of time before every snapshot was stored (storage still down), or the
    writer failed (see `__cause__`).

    rows: upserted plus deleted rows not stored; tables: which tables they belong to.
    """

    def __init__(self, rows: int, tables: list[str], reason: str) -> None:
        self.rows = rows
        self.tables = tables
        super().__init__(f"{rows} row(s) of tables {tables} were not stored: {reason}")


class WriterFailedError(ProducerError):
    """The background writer met an error it cannot retry (storage refused a packet for good,
    a bug, or a packet it cannot encode); raised on the training thread at the next call so it
    is never silent. The unstored rows stay counted: `close()` reports them.

    uri: the packet the writer was storing ("" when the failure was not about one packet);
    cause: the error (also `__cause__`).
    """

    def __init__(self, message: str, *, uri: str = "", cause: BaseException | None = None) -> None:
        self.uri = uri
        self.cause = cause
        super().__init__(message)


class ProducerClosedError(ProducerError):
    """The producer is closed; it does not reopen."""


class NonFiniteRowsWarning(UserWarning):
    """A table's shipped rows hold NaN or Inf (warned once per table, on the training thread,
    so it shows without any logging set up; loaders refuse such packets unless
    `persia_inc.loader.allow_non_finite`)."""


def warn_caller(warning: Warning) -> None:
    """`warnings.warn` pointing at the first frame outside this package: the user's call."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: the frame that called us
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(warning, stacklevel=level)
