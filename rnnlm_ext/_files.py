"""File-system helpers shared by the benchmark, the language model's training and its data sets."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def check_writable(folder: str, name: str) -> None:
    """Make `folder` and write a file in it, so that a path that cannot take the output fails
    before the work (training, timing), with the setting's name, rather than after it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{name}: {folder!r} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{name}: cannot write to the folder {folder!r} ({err.strerror})") from None


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """write(file) to a temporary file beside `path`, then rename it over `path`: a crash or
    an error mid-write leaves the previous file intact and no temporary behind."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)
