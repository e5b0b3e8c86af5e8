"""Checkpoints of `rnnlm train --save`: a file from someone else never runs code, a damaged one is refused whole."""

import math
import re
import warnings

import pytest
import torch

from rnnlm_ext.lm.cli import main
from rnnlm_ext.lm.errors import CheckpointWarning
from rnnlm_ext.lm.train import (
    CHECKPOINT,
    SettingError,
    TrainConfig,
    _atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    train,
)

TINY = dict(hidden_size=8, layers=1, epochs=1, progress=False)


def quiet(_):
    pass


class WritesAFile:
    """Unpickled by a loader that runs code, it creates the file at `marker` (pickle calls open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(params=["bare", "sealed"])
def malicious(tmp_path, request):
    """A folder whose checkpoint.pt is a valid checkpoint with one object that writes a marker file when loaded:
    bare (the payload itself, as before checksums) or sealed with a correct checksum, as an attacker can."""
    run = tmp_path / "run"
    train(TrainConfig(**TINY, stop_after=2, save=str(run)), log=quiet)
    ckpt = load_checkpoint(str(run))
    del ckpt["path"]
    ckpt["history"] = [WritesAFile(tmp_path / "marker")]
    if request.param == "sealed":
        _atomic_save(ckpt, str(run))
    else:
        torch.save(ckpt, run / CHECKPOINT)
    return run, tmp_path / "marker"


def test_a_checkpoint_that_would_run_code_is_refused_by_the_library(malicious):
    run, marker = malicious
    for load in (
        lambda: load_checkpoint(str(run)),
        lambda: model_from_checkpoint(load_checkpoint(str(run), "run")),
        lambda: train(TrainConfig(resume=str(run), progress=False), log=quiet),
    ):
        with pytest.raises(SettingError, match=r"^(folder|run|resume): .*checkpoint.pt' holds .*could run code"):
            load()
        assert not marker.exists()


@pytest.mark.parametrize(
    "command", [["train", "--resume", "RUN", "--no-progress"], ["generate", "--checkpoint", "RUN", "--prompt", "one"]]
)
def test_a_checkpoint_that_would_run_code_is_refused_by_the_commands(malicious, capsys, command):
    run, marker = malicious
    assert main([str(run) if a == "RUN" else a for a in command]) == 1
    err = capsys.readouterr().err
    flag = command[1]
    assert err.startswith(f"rnnlm {command[0]}: error: {flag}: "), err
    assert "could run code" in err and "io.open" in err, err  # what it refused, and why
    assert not marker.exists()


@pytest.fixture
def saved(tmp_path):
    """A folder holding the checkpoint of a run stopped after three steps."""
    run = tmp_path / "run"
    train(TrainConfig(**TINY, stop_after=3, save=str(run)), log=quiet)
    return run


NAN32 = b"\x00\x00\xc0\x7f"  # a float32 NaN, little-endian


def same(a, b) -> bool:
    """a and b hold the same values (nested dicts, lists, tuples, tensors, numbers, strings)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_damaged_checkpoint_is_refused_not_half_loaded(saved):
    """Four bytes overwritten anywhere (a NaN's bytes, as the issue found them): the file is refused with its
    name, or (in the zip's redundant index) loads exactly what was saved; never something in between."""
    path = saved / CHECKPOINT
    good = path.read_bytes()
    expected = load_checkpoint(str(saved))
    refused = 0
    for offset in range(0, len(good) - 4, len(good) // 60):
        damaged = good[:offset] + NAN32 + good[offset + 4 :]
        path.write_bytes(damaged)
        try:
            loaded = load_checkpoint(str(saved))
        except SettingError as err:
            assert re.match(rf"^folder: '{path}' (is damaged|is not a readable checkpoint)", str(err)), str(err)
            refused += 1
        else:
            assert damaged == good or same(loaded, expected), f"bytes {offset}..{offset + 3} loaded, changed"
    assert refused > 50  # nearly all of the file is the payload
    # inside the optimizer's state, where the NaN appeared: resuming refuses, trains nothing, changes nothing
    at = good.rindex(b"exp_avg_sq")  # a name near the end of the payload: the bytes before it are tensor data
    damaged = good[: at - 64] + NAN32 + good[at - 60 :]
    path.write_bytes(damaged)
    lines = []
    with pytest.raises(SettingError, match=rf"^resume: '{path}' is damaged: .*SHA-256"):
        train(TrainConfig(resume=str(saved), progress=False), log=lines.append)
    assert lines == [] and path.read_bytes() == damaged


def test_the_command_names_the_damaged_file(saved, capsys):
    path = saved / CHECKPOINT
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2] + NAN32 + good[len(good) // 2 + 4 :])
    assert main(["train", "--resume", str(saved), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"rnnlm train: error: --resume: '{path}' is"), err
    assert "resumed" not in out


def test_a_non_finite_tensor_is_refused_and_named(saved):
    """A checkpoint intact on disk but holding a NaN (written by hand, or by a run gone wrong) is not used."""
    ckpt = load_checkpoint(str(saved))
    del ckpt["path"]
    first = next(iter(ckpt["optimizer"]["state"]))
    ckpt["optimizer"]["state"][first]["exp_avg_sq"].view(-1)[0] = math.nan
    _atomic_save(ckpt, str(saved))
    with pytest.raises(
        SettingError, match=rf"^resume: .* non-finite .*optimizer\['state'\]\[{first}\]\['exp_avg_sq'\]"
    ):
        train(TrainConfig(resume=str(saved), progress=False), log=quiet)


def test_a_checkpoint_without_a_checksum_loads_with_a_warning_and_is_checked_for_non_finite_values(saved, capsys):
    """Checkpoints written before the checksum existed still resume; nothing can tell whether they are damaged,
    so the loader says so. Their tensors are still checked, and the next save writes a checksum."""
    ckpt = load_checkpoint(str(saved))
    del ckpt["path"]
    torch.save(ckpt, saved / CHECKPOINT)  # the older format: the payload itself
    with pytest.warns(CheckpointWarning, match=r"^resume: .* has no checksum"):
        result = train(TrainConfig(resume=str(saved), progress=False, stop_after=4), log=quiet)
    assert result["stopped_at_step"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(str(saved))  # rewritten with its checksum: no warning
    torch.save(ckpt, saved / CHECKPOINT)
    assert main(["generate", "--checkpoint", str(saved), "--prompt", "one"]) == 0
    assert "rnnlm generate: warning: --checkpoint: " in capsys.readouterr().err
    ckpt["model"][next(iter(ckpt["model"]))].view(-1)[0] = math.inf
    torch.save(ckpt, saved / CHECKPOINT)
    with pytest.warns(CheckpointWarning), pytest.raises(SettingError, match=r"non-finite .*model\['"):
        load_checkpoint(str(saved))


def test_resuming_a_finished_run_says_it_is_complete_trains_nothing_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--hidden", "8", "--layers", "1", "--epochs", "1", "--no-progress", "--save", str(run)]) == 0
    finished = capsys.readouterr().out.splitlines()[-1]  # "final: valid_loss ..."
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    folder = run.stat().st_mtime_ns
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^the run in .*/run is already complete \(1 of 1 epochs\)", out), out
    assert "resumed" not in out and out.splitlines()[-1] == finished  # its final figures, not new ones
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()} == files
    assert run.stat().st_mtime_ns == folder
    lines = []
    result = train(TrainConfig(resume=str(run), progress=False), log=lines.append)
    assert result["complete"] and len(result["epochs"]) == 1 and len(lines) == 1, lines
