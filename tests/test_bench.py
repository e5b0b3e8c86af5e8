"""The layer benchmark runs end to end, writes its results, and refuses wrong numbers."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from rnnlm_ext import RNN, benchmark


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    rows = benchmark.main(["--shapes", "3,2,4;2,1,5", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert [(r.nonlinearity, r.T, r.B, r.H, r.pass_) for r in rows] == [
        (act, *shape, pass_)
        for act in ("tanh", "relu")
        for shape in ((3, 2, 4), (2, 1, 5))
        for pass_ in ("fwd+bwd", "fwd")
    ]
    for r in rows:
        assert set(r.ms) == {"rnnlm_ext", "nn.RNN", "python loop"}
    # the floor is the FLOPs at the matmul rate: forward+backward three times the forward's
    assert rows[0].floor_ms == pytest.approx(3 * rows[1].floor_ms)
    saved = json.loads((tmp_path / "rnn_cpu.json").read_text())
    assert saved["rows"] == [dataclasses.asdict(r) for r in rows]
    assert saved["meta"]["threads"] == torch.get_num_threads()
    assert saved["meta"]["machine"]  # the CPU's model name, for reading the numbers later
    # the GEMM rates of the run: torch.mm's (the floor's), and oneDNN's, which nn.LSTM runs on
    rates = saved["meta"]["rates"]["torch.float32"]
    assert rates["matmul_gflops"] > 0
    assert rates["onednn_gflops"] is None or rates["onednn_gflops"] > 0
    assert (tmp_path / "rnn_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = rows[0]
    assert (
        f"| tanh | fwd+bwd | float32 | 3 | 2 | 4 | {r.ms['rnnlm_ext']:.3f} | {r.ms['nn.RNN']:.3f} "
        f"| {r.ms['python loop']:.3f} | {r.floor_ms:.3f} | {r.ratio('nn.RNN', 'rnnlm_ext'):.2f}x |"
    ) in capsys.readouterr().out


@pytest.mark.parametrize("cell,theirs", [("lstm", "nn.LSTM"), ("gru", "nn.GRU")])
def test_bench_gated_cells_against_torch_nn_and_the_cell_loop(cell, theirs, tmp_path, capsys):
    """--cell lstm|gru: the same protocol against nn.LSTM / nn.GRU and a loop over their
    *Cell; the floor counts G = 4 / 3 gate blocks; results in <cell>_cpu.{json,png}."""
    argv = ["--cell", cell, "--shapes", "3,2,4", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    rows = benchmark.main(argv)
    assert [(r.cell, r.nonlinearity, r.pass_) for r in rows] == [
        (cell, benchmark.GATED_ACT, "fwd+bwd"),
        (cell, benchmark.GATED_ACT, "fwd"),
    ]
    assert set(rows[0].ms) == {"rnnlm_ext", theirs, "python loop"}
    plain = benchmark.main(
        ["--shapes", "3,2,4", "--nonlinearity", "tanh", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    )
    gates = benchmark.CELLS[cell][3]
    # the floors' ratio is the FLOPs' ratio: G times the Elman cell's, the GEMM rates apart
    ratio = (rows[0].floor_ms / plain[0].floor_ms) / gates
    assert 0.2 < ratio < 5, ratio
    saved = json.loads((tmp_path / f"{cell}_cpu.json").read_text())
    assert saved["rows"] == [dataclasses.asdict(r) for r in rows]
    assert (tmp_path / f"{cell}_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| cell | pass | dtype | T | B | H |" in printed
    assert f"| {cell} | fwd+bwd | float32 | 3 | 2 | 4 |" in printed


def test_gated_cells_refuse_the_elman_nonlinearity(capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--cell", "gru", "--nonlinearity", "relu"])
    assert exit_.value.code == 2 and "--nonlinearity is the Elman cell's" in capsys.readouterr().err


def test_check_refuses_an_implementation_that_disagrees():
    torch.manual_seed(0)
    theirs, ours = nn.RNN(4, 5, dtype=torch.float64), RNN(4, 5, dtype=torch.float64)  # different weights
    x, h0, dout = torch.randn(3, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 5, dtype=torch.float64), None
    with pytest.raises(AssertionError, match="output differs from nn.RNN's"):
        benchmark.check(theirs, ours, x, h0, dout, 1e-9, False, "test")
    ours.load_state_dict(theirs.state_dict())
    benchmark.check(theirs, ours, x, h0, torch.randn(3, 2, 5, dtype=torch.float64), 1e-9, True, "test")


@pytest.mark.parametrize("shapes", ["3,x,4", "3,2", "3,0,4", ""])
def test_bad_shapes_flag_is_refused(shapes, capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--shapes", shapes])
    assert exit_.value.code == 2 and "--shapes takes 'T,B,H" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dtypes", "foo"], "--dtypes takes a comma-separated list of float32, float64 on cpu"),
        (["--dtypes", "float16"], "--dtypes takes a comma-separated list of float32, float64 on cpu"),
        (["--out", "FILE/sub"], "--out: cannot write to the folder"),
    ],
)
def test_bad_flags_are_refused_before_timing(args, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    args = [a.replace("FILE", str(tmp_path / "a_file")) for a in args]
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(args)
    err = capsys.readouterr()
    assert exit_.value.code == 2 and message in err.err and "matmul" not in err.out, err


@pytest.mark.slow
@pytest.mark.parametrize("module", ["rnnlm_ext", "rnnlm_ext.benchmark"])
def test_the_library_imports_without_the_extras_and_without_the_language_model(module):
    """tqdm and matplotlib made unimportable, as where they are not installed (torch copes without them)."""
    code = (
        "import sys\n"
        "sys.modules['tqdm'] = sys.modules['matplotlib'] = None\n"
        f"import {module}\n"
        "print(sorted(m for m in sys.modules if m.startswith('rnnlm_ext.lm')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
