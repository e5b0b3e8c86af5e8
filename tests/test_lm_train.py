"""Training: determinism, exact resume, atomic checkpoints, the non-finite-loss stop, DDP with two processes."""

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from rnnlm_ext._files import atomic_write
from rnnlm_ext.lm import data
from rnnlm_ext.lm.train import (
    CHECKPOINT,
    RUN_FIELDS,
    SettingError,
    TrainConfig,
    TrainingError,
    _atomic_save,
    _perplexity,
    load_checkpoint,
    resolve,
    train,
)

# Small enough for a second or two: Human Numbers, 50 batches of 64 x 16 per epoch.
SMALL = dict(hidden_size=16, layers=2, dropout=0.2, epochs=2, progress=False)


def quiet(_):
    pass


def test_same_seed_same_run_and_json(tmp_path):
    path = tmp_path / "m.json"
    a = train(TrainConfig(**SMALL, json=str(path)), log=quiet)
    b = train(TrainConfig(**SMALL), log=quiet)
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    saved = json.loads(path.read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert set(saved["final"]) == {"valid_loss", "valid_accuracy", "perplexity", "tokens_per_s"}
    assert saved["final"]["perplexity"] == pytest.approx(math.exp(saved["final"]["valid_loss"]))
    assert saved["epochs"][-1]["valid_loss"] < saved["epochs"][0]["train_loss"]  # it learns


@pytest.fixture(scope="module")
def whole():
    return train(TrainConfig(**SMALL), log=quiet)


@pytest.mark.parametrize("stop_after", [37, 50, 63])  # mid epoch 1, at its end, mid epoch 2
def test_interrupted_and_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, whole, stop_after):
    ckpt = str(tmp_path / "run")
    part = train(TrainConfig(**SMALL, save=ckpt, stop_after=stop_after), log=quiet)
    assert part["stopped_at_step"] == stop_after
    assert load_checkpoint(ckpt)["batch"] == stop_after % 50
    resumed = train(TrainConfig(resume=ckpt, progress=False), log=quiet)
    for key in ("train_loss", "valid_loss", "valid_accuracy"):
        assert [e[key] for e in resumed["epochs"]] == [e[key] for e in whole["epochs"]], key


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    ckpt = str(tmp_path / "run")
    train(TrainConfig(**{**SMALL, "epochs": 1}, save=ckpt), log=quiet)
    good = load_checkpoint(ckpt)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*stopped.*new run with a lower lr") as err:
        train(TrainConfig(**{**SMALL, "epochs": 1}, lr=1e12, clip=0, save=ckpt, save_every=1), log=quiet)
    assert {"lr", "clip"} <= set(err.value.names)
    kept = load_checkpoint(ckpt)
    assert all(torch.isfinite(p).all() for p in kept["model"].values())
    # save_every=1: the last step before the blown-up batch was checkpointed, over the good run's end
    blown_up = int(re.search(r"batch (\d+)", str(err.value)).group(1))
    assert (kept["epoch"], kept["batch"]) == ((0, blown_up - 1) if blown_up > 1 else (1, 0))
    assert not os.path.exists(os.path.join(ckpt, CHECKPOINT + ".tmp"))
    assert good["vocab"] == kept["vocab"]


def test_corrupt_and_missing_checkpoints_are_reported(tmp_path):
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(SettingError, match="^resume: .* is not a readable checkpoint"):
        train(TrainConfig(resume=str(tmp_path)), log=quiet)
    with pytest.raises(FileNotFoundError, match="^resume: no checkpoint.pt"):
        train(TrainConfig(resume=str(tmp_path / "nowhere")), log=quiet)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("bptt", 0, "bptt must be >= 1"),
        ("bs", 40000, "bs 40000 is too large"),
        ("hidden_size", 0, "hidden_size must"),
        ("dropout", 1.0, "dropout must be in"),
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("lr", math.inf, "lr must be a finite number > 0"),
        ("lr", math.nan, "lr must be a finite number > 0"),
        ("clip", -1.0, "clip must be a finite number >= 0"),
        ("clip", math.nan, "clip must be a finite number >= 0"),
        ("wd", -1.0, "wd must be a finite number >= 0"),
        ("save_every", -1, "save_every must be >= 0"),
        ("stop_after", 0, "stop_after must be >= 1"),
        ("min_freq", 0, "min_freq must be >= 1"),
        ("max_vocab", 0, "max_vocab must be >= 1"),
        ("nonlinearity", "gelu", "nonlinearity must be relu or tanh"),
        ("tie_weights", True, "tie_weights needs model rnn, shared or lmmodel5-7"),
    ],
)
def test_bad_settings_name_the_parameter(field, value, message):
    settings = {**SMALL, field: value, **({"model": "lmmodel4"} if field == "tie_weights" else {})}
    with pytest.raises(SettingError, match="^" + message) as err:
        train(TrainConfig(**settings), log=quiet)
    assert field in err.value.names


def test_output_paths_that_cannot_be_written_fail_before_training(tmp_path):
    lines = []
    (tmp_path / "a_file").write_text("")
    for kwargs, message in [
        (dict(save=str(tmp_path / "a_file")), "save: .* exists and is not a folder"),
        (dict(save=str(tmp_path / "a_file" / "run")), "save: cannot write to the folder"),
        (dict(json=str(tmp_path)), "json: .* is a folder; give a file path"),
        (dict(json=str(tmp_path / "a_file" / "r.json")), "json: .*a_file' exists and is not a folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            train(TrainConfig(**SMALL, **kwargs), log=lines.append)
    assert lines == []  # nothing trained


def test_resume_refuses_changed_settings_and_a_changed_data_set(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["one two three four five six"] * 300))
    run = str(tmp_path / "run")
    small = dict(SMALL, dataset=str(text), bs=8)
    train(TrainConfig(**small, save=run, stop_after=5), log=quiet)
    with pytest.raises(SettingError, match=r"resume continues the run .* lr 0.01 \(the run's: 0.003\)"):
        train(TrainConfig(resume=run, lr=0.01), log=quiet, explicit=["lr"])
    before = load_checkpoint(run)["batch"]
    text.write_text(" ".join(["one two three four five six"] * 400))
    with pytest.raises(SettingError, match=r"resume: the data set .* changed since the checkpoint"):
        train(TrainConfig(resume=run, progress=False), log=quiet)
    assert load_checkpoint(run)["batch"] == before  # the checkpoint is left as it was


def test_checkpoints_that_do_not_fit_are_reported(tmp_path):
    run = str(tmp_path / "run")
    train(TrainConfig(**SMALL, save=run, stop_after=3), log=quiet)
    good = load_checkpoint(run)
    del good["path"]
    for name, change, message in [
        ("weights", lambda c: c["config"].update(hidden_size=32), "the weights in .* do not fit the model"),
        ("no_vocab", lambda c: c.pop("vocab"), "is not a checkpoint of `rnnlm train --save` .*lacks vocab"),
        ("settings", lambda c: c["config"].update(foo=1), "the settings stored in .* are not those of this version"),
        ("no_optimizer", lambda c: c.pop("optimizer"), "resume: .* cannot be resumed .*lacks optimizer"),
    ]:
        ckpt = {**good, "config": dict(good["config"])}
        change(ckpt)
        _atomic_save(ckpt, str(tmp_path / name))
        with pytest.raises(ValueError, match=message):
            train(TrainConfig(resume=str(tmp_path / name), progress=False), log=quiet)


def test_perplexity_of_a_diverged_model_is_inf_not_an_overflow():
    assert _perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert _perplexity(888.5) == math.inf


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("previous")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), fail)
    assert path.read_text() == "previous" and not (tmp_path / "r.json.tmp").exists()


def _most_frequent_token_accuracy(cfg: TrainConfig) -> float:
    """The valid accuracy of always predicting the train stream's most frequent token."""
    corpus = data.load_corpus(cfg.dataset)
    return (corpus.valid == corpus.train.bincount().argmax()).float().mean().item()


@pytest.mark.parametrize("model,bptt", [("lmmodel1", 3), ("lmmodel3", 3), ("shared", 8)])
def test_fastbook_models_learn_more_than_the_token_frequencies(model, bptt):
    cfg = TrainConfig(model=model, hidden_size=16, layers=1, bptt=bptt, epochs=1, progress=False)
    final = train(cfg, log=quiet)["final"]
    assert final["valid_accuracy"] > _most_frequent_token_accuracy(cfg) + 0.1, final


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_stay_in_sync(tmp_path):
    """torchrun, two gloo processes, each on its own rows; train() checks every epoch that the weights agree."""
    out = tmp_path / "ddp.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "rnnlm_ext.lm.cli",
        "train",
        "--hidden",
        "16",
        "--layers",
        "1",
        "--epochs",
        "2",
        "--bs",
        "16",
        "--save",
        str(tmp_path / "run"),
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    # 50,476 train tokens cut into 2 x 16 rows: 1,577 tokens a row, 1,576 inputs, each read once
    assert result["epochs"][0]["train_tokens"] == 32 * 1576
    assert proc.stdout.count("final:") == 1  # only rank 0 reports


def test_tokens_per_s_leaves_out_mid_epoch_checkpoint_writes(tmp_path, monkeypatch):
    """Each save moves the clock on by 100 s: none of it may count as training time."""
    import time

    from rnnlm_ext.lm import train as train_module

    real_save, real_clock, skipped = train_module._atomic_save, time.perf_counter, [0.0]

    def slow_save(obj, folder):
        real_save(obj, folder)
        skipped[0] += 100.0

    monkeypatch.setattr(train_module, "_atomic_save", slow_save)
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skipped[0])
    cfg = TrainConfig(hidden_size=8, layers=1, epochs=1, progress=False, save=str(tmp_path / "run"), save_every=10)
    epoch = train(cfg, log=quiet)["epochs"][0]  # 50 batches: 4 mid-epoch saves
    assert epoch["train_time"] < 50, epoch["train_time"]
    assert epoch["tokens_per_s"] == epoch["train_tokens"] / epoch["train_time"]


def test_non_finite_loss_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint was written to .* yet"):
        train(TrainConfig(**{**SMALL, "epochs": 1}, lr=1e12, clip=0, save=str(tmp_path / "run")), log=quiet)


def test_lmmodel1_with_a_valid_stream_too_short_for_one_batch_is_a_clear_error(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["a", "b", "c", "d"] * 25))  # 101 tokens: 20 valid, rows of 2 at --bs 8
    with pytest.raises(SettingError, match="bptt 3 is longer than a valid row"):
        train(
            TrainConfig(
                dataset=str(text), model="lmmodel1", bptt=3, bs=8, hidden_size=8, layers=1, epochs=1, progress=False
            ),
            log=quiet,
        )


def test_train_flushes_denormals_itself():
    torch.set_flush_denormal(False)
    train(TrainConfig(**{**SMALL, "epochs": 1}, stop_after=1), log=quiet)
    assert torch.tensor([1e-40]).item() == 0.0  # a float32 denormal reads as zero


def test_a_checkpoint_stores_every_run_setting_under_its_parameter_name(tmp_path):
    run = str(tmp_path / "run")
    cfg = TrainConfig(**SMALL, save=run, stop_after=3)
    train(cfg, log=quiet)
    ckpt = load_checkpoint(run)
    assert ckpt["config"] == {k: getattr(resolve(cfg), k) for k in RUN_FIELDS}
    assert ckpt["config"]["hidden_size"] == 16 and "hidden" not in ckpt["config"]
    assert ckpt["hidden_state"].shape == (2, 64, 16)  # [L,B,H], the carried state mid-epoch
    sums = ckpt["per_rank"][0]["sums"]  # the epoch's running sums after its first three steps
    assert len(sums["losses"]) == 3 and sums["tokens"] == 3 * 64 * 16
    assert sums["loss"] == pytest.approx(sum(sums["losses"]) * 64 * 16)


def test_a_progress_bar_asked_for_without_tqdm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # what a missing package looks like to import
    with pytest.raises(SettingError, match="progress needs tqdm"):
        train(TrainConfig(**{**SMALL, "progress": True}), log=quiet)
    result = train(TrainConfig(**{**SMALL, "progress": None}, stop_after=2), log=quiet)  # unset: no bar, no error
    assert result["stopped_at_step"] == 2
