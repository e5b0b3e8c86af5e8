"""Checkpoints of `rnnlm train --save`: a file from someone else never runs code."""

import pytest
import torch

from rnnlm_ext.lm.cli import main
from rnnlm_ext.lm.train import CHECKPOINT, SettingError, TrainConfig, load_checkpoint, model_from_checkpoint, train

TINY = dict(hidden_size=8, layers=1, epochs=1, progress=False)


def quiet(_):
    pass


class WritesAFile:
    """Unpickled by a loader that runs code, it creates the file at `marker` (pickle calls open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def malicious(tmp_path):
    """A folder whose checkpoint.pt is a valid checkpoint with one object that writes a marker file when loaded."""
    run = tmp_path / "run"
    train(TrainConfig(**TINY, stop_after=2, save=str(run)), log=quiet)
    ckpt = load_checkpoint(str(run))
    del ckpt["path"]
    ckpt["history"] = [WritesAFile(tmp_path / "marker")]
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
