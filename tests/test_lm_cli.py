"""`rnnlm train | generate` end to end on small runs, and bad input reported with the argument's name."""

import json
import re
import signal
import subprocess
import sys

import pytest

from rnnlm_ext.lm import data, models
from rnnlm_ext.lm.cli import main
from rnnlm_ext.lm.generate import generate
from rnnlm_ext.lm.train import TrainConfig, resolve

TINY = ["--hidden", "16", "--layers", "1", "--epochs", "1", "--no-progress"]


def test_train_resume_generate_on_human_numbers(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--epochs", "2", "--save", run, "--stop-after", "60"]) == 0
    out = capsys.readouterr().out
    assert "epoch train_loss valid_loss accuracy perplexity" in " ".join(out.split())
    assert "stopped after step 60; continue with --resume" in out
    assert main(["train", "--resume", run, "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "final: valid_loss" in out
    assert [e["epoch"] for e in json.loads((tmp_path / "r.json").read_text())["epochs"]] == [1, 2]
    assert (
        main(["generate", "--checkpoint", run, "--prompt", "one . two .", "--tokens", "12", "--temperature", "0"]) == 0
    )
    words = capsys.readouterr().out.split()
    assert words[:4] == ["one", ".", "two", "."] and len(words) == 16
    assert set(words) <= set(
        " . ".join(
            [
                "one two three four five six seven eight nine ten eleven twelve thirteen",
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty",
                "fifty sixty seventy eighty ninety hundred thousand",
            ]
        ).split()
    )


@pytest.mark.slow
def test_char_level_text_file_through_the_console_entry(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question.\n" * 40)
    run = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnlm_ext.lm.cli",
            "train",
            "--dataset",
            str(text),
            "--level",
            "char",
            "--bs",
            "4",
            "--bptt",
            "8",
            "--model",
            "shared",
            *TINY,
            "--save",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert train.returncode == 0, train.stderr
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnlm_ext.lm.cli",
            "generate",
            "--checkpoint",
            str(run),
            "--prompt",
            "to be",
            "--tokens",
            "20",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert gen.returncode == 0, gen.stderr
    text = gen.stdout.removesuffix("\n")  # print's newline; a generated one stays
    assert text.startswith("to be") and len(text) >= len("to be") + 20, repr(text)  # 20 tokens, >= 1 char each


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "/no/such/file.txt"], "--dataset: no such file or folder"),
        (["--dataset", "EMPTY"], "--dataset: corpus .* is empty"),
        (["--bptt", "0"], "--bptt must be >= 1"),
        (["--bs", "30000"], "--bs 30000 is too large for the train stream"),
        (["--resume", "CORRUPT"], "--resume: .* is not a readable checkpoint"),
        (["--hidden", "0"], "--hidden must be >= 1, got 0"),
        (["--save-every", "-1"], "--save-every must be >= 0"),
        (["--model", "lmmodel4", "--tie-weights"], "--tie-weights needs --model rnn, shared or lmmodel5-7"),
        (["--lr", "1e12", "--clip", "0"], "new run with a lower --lr or a smaller --clip \\(--resume keeps"),
    ],
)
def test_train_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "checkpoint.pt").write_bytes(b"\x00garbage")
    args = [
        str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "corrupt") if a == "CORRUPT" else a
        for a in args
    ]
    assert main(["train", *TINY, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rnnlm train: error: ")
    assert re.search(message, err), err


def test_generate_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "one"]) == 1
    assert "no checkpoint.pt" in capsys.readouterr().err
    run = str(tmp_path / "run")
    main(["train", *TINY, "--save", run])
    capsys.readouterr()
    assert main(["generate", "--checkpoint", run, "--prompt", "one zillion"]) == 1
    assert "'zillion' is not in the vocabulary" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--prompt", "one", "--tokens", "-1"]) == 1
    assert "--tokens must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--prompt", " "]) == 1
    assert "--prompt must hold at least one token" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--prompt", "one", "--temperature", "nan"]) == 1
    assert "--temperature must be a finite number >= 0" in capsys.readouterr().err


def test_resume_names_the_flags_it_would_ignore(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--stop-after", "3", "--save", run]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", run, "--lr", "0.01", "--hidden", "16", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run's: 0.003)" in err and "--hidden" not in err, err  # --hidden 16 is the run's


@pytest.mark.slow
def test_ctrl_c_stops_at_a_batch_boundary_checkpointed_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rnnlm_ext.lm.cli",
            "train",
            "--hidden",
            "16",
            "--layers",
            "1",
            "--epochs",
            "200",
            "--no-progress",
            "--save",
            str(run),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # training has started once the first epoch's row is out
        if line.split()[:1] == ["1"]:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped after step" in out and (run / "checkpoint.pt").exists()


def test_bench_is_the_kernel_benchmark_with_its_defaults_in_the_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: rnnlm bench")
    for default in ("(default: 25)", "(default: 3)", "(default: cpu)", "16,64,64;16,64,256", "T=128"):
        assert default in out, default
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--repeats", "0"])
    assert exit_.value.code == 2 and "--repeats must be >= 1" in capsys.readouterr().err


def test_train_help_has_a_flag_with_its_default_for_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    options = " ".join(capsys.readouterr().out.split("options:")[1].split())
    for flag, default in [
        ("--hidden HIDDEN_SIZE", "(default: 256 for rnn, shared; 64 for lmmodel1-7)"),
        ("--dropout DROPOUT", "(default: 0.0 for rnn, shared, lmmodel1-6; 0.4 for lmmodel7)"),
        ("--save-every STEPS", "(default: 0)"),
        ("--lr LR", "(default: 0.003 for rnn, shared, lmmodel3-5; 0.001 for lmmodel1-2; 0.01 for lmmodel6-7)"),
        ("--weight-drop WEIGHT_DROP", "(default: 0.0)"),
        ("--ar AR", "(default: 0.0 for rnn, shared, lmmodel1-6; 2.0 for lmmodel7)"),
    ]:
        assert default in options[options.index(flag) :].split(" --")[0], flag
    assert "--progress, --no-progress" in options and "--tie-weights" in options


def test_flags_reach_the_settings_they_name(tmp_path):
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "train",
                "--hidden",
                "8",
                "--layers",
                "1",
                "--epochs",
                "1",
                "--stop-after",
                "2",
                "--no-progress",
                "--max-vocab",
                "100",
                "--save-every",
                "1",
                "--tie-weights",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    config = json.loads(out.read_text())["config"]
    expected = {
        **vars(resolve(TrainConfig())),
        "hidden_size": 8,
        "layers": 1,
        "epochs": 1,
        "stop_after": 2,
        "progress": False,
        "max_vocab": 100,
        "save_every": 1,
        "tie_weights": True,
        "json": str(out),
    }
    assert config == expected


def test_lmmodel1_generates_from_the_last_three_tokens():
    """LMModel1 reads exactly three tokens: the context is the prompt's last three, then the last three generated."""
    import torch

    torch.manual_seed(0)
    vocab = data.load_corpus("human-numbers").vocab
    model = models.LMModel1(len(vocab), 16).eval()
    prompt = "seven . eight . nine"
    ids = vocab.encode(prompt.split()).tolist()
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids[-3:]])).argmax()))
    assert generate(model, vocab, "word", prompt, 5, temperature=0).split() == vocab.decode(ids)
    with pytest.raises(ValueError, match="prompt must hold at least 3 tokens for lmmodel1"):
        generate(model, vocab, "word", "one .", 5)


def test_bad_files_and_paths_are_named_not_an_errno(tmp_path, capsys):
    (tmp_path / "binary.txt").write_bytes(b"abc\xff\xfe\x00def")
    assert main(["train", *TINY, "--dataset", str(tmp_path / "binary.txt")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"--dataset: .*binary.txt' is not UTF-8 text", err), err
    (tmp_path / "a_file").write_text("")
    assert main(["train", *TINY, "--stop-after", "1", "--json", str(tmp_path / "a_file" / "r.json")]) == 1
    err = capsys.readouterr().err
    assert re.search("--json: .*a_file' exists and is not a folder", err), err
    # a folder that does not exist yet is made, as for --save
    assert main(["train", *TINY, "--stop-after", "1", "--json", str(tmp_path / "new" / "r.json")]) == 0
    assert (tmp_path / "new" / "r.json").exists()
