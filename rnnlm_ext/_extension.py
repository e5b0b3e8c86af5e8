"""Loads the compiled extension rnnlm_ext._C, refusing one built against another torch release."""

import re

import torch


def _torch_release(version: str) -> tuple:
    """(major, minor, patch) of a torch version: '2.13.0+cpu' and '2.13.0a0+git1' give (2, 13, 0)."""
    return tuple(int(n) for n in re.match(r"(\d+)\.(\d+)\.(\d+)", version).groups())


def check_torch_version(built: str, running: str) -> None:
    # torch's C++ ABI is not stable across releases: a mismatch fails later, or worse, silently
    if _torch_release(built) != _torch_release(running):
        raise RuntimeError(
            f"rnnlm_ext: the compiled extension was built against torch {built}, but torch {running} is "
            "running; rebuild it against this torch (`pip install --no-build-isolation .` in the source tree)"
        )


try:
    from rnnlm_ext import _C
except ModuleNotFoundError:
    raise  # not built at all: rnnlm_ext.rnn falls back to the reference
except ImportError as err:
    raise RuntimeError(
        f"rnnlm_ext: the compiled extension does not load under torch {torch.__version__} ({err}); it was "
        "most likely built against another torch: rebuild it against this one "
        "(`pip install --no-build-isolation .` in the source tree)"
    ) from err
check_torch_version(_C.build_info()["torch_version"], torch.__version__)
