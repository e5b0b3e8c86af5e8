"""File-system checks shared by the benchmark and the language model's training."""
from __future__ import annotations

import os
import tempfile


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
