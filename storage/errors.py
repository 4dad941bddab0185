"""Storage errors: built-ins where they fit, `StorageError` for the rest.

Absent objects raise `FileNotFoundError`, denied access `PermissionError`; everything else is a
`StorageError` that says whether trying again may help (`retriable`). Each backend translates
its library's errors in one place, by type or code, never by message text.
"""

from __future__ import annotations


class StorageError(OSError):
    """A storage operation failed; `retriable` says whether a retry may succeed."""

    retriable: bool = False

    def __init__(self, uri: str, reason: str, *, retriable: bool | None = None) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason
        if retriable is not None:
            self.retriable = retriable


class TransientStorageError(StorageError):
    """Connection refused or reset, 5xx, throttling: worth retrying with backoff."""

    retriable = True


class BackendUnavailableError(StorageError):
    """The library behind a URI scheme is not installed."""
