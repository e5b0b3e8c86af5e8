"""The language model's two error types: a setting that cannot work, and training that cannot go on.

Both name the library's parameters (`lr`, `save`); `names` lists those a message mentions, so
that the command line can write them as its flags (`--lr`, `--save`).
"""

from __future__ import annotations


class SettingError(ValueError):
    """A setting that cannot work; the message says which and what it takes."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, ranks out of sync); the message says why and what was kept."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but cannot be fully checked (an older one, without a checksum)."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names
