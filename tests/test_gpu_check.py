"""bench/gpu_check.sh's own plumbing, without a GPU: its options, and that a run which cannot
build still hands back its summary and logs in at most the files the device tool returns."""

import shutil
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
MAX_FILES = 8  # what the GPU machine hands back from $OUT


def run(tmp_path, *args, **env):
    # a copy of the script, so that its `rm -rf build` acts on tmp_path, not on this tree
    (tmp_path / "bench").mkdir()
    shutil.copy(SCRIPT, tmp_path / "bench" / SCRIPT.name)
    return subprocess.run(
        ["bash", str(tmp_path / "bench" / SCRIPT.name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), **env},
    )


def test_an_unknown_option_is_refused(tmp_path):
    result = run(tmp_path, "--fast")
    assert result.returncode == 2
    assert "the only option is --quick, got '--fast'" in result.stderr


def test_a_failed_build_still_returns_the_summary_and_logs(tmp_path):
    out = tmp_path / "out"
    result = run(tmp_path, "--quick", OUT=str(out), PYTHON="false")  # `false` fails every stage
    assert result.returncode == 1, result.stdout + result.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["logs.tar.gz", "summary.txt"] and len(files) <= MAX_FILES
    summary = (out / "summary.txt").read_text()
    assert "budget 300s, quick=1" in summary
    assert "build" in summary and "FAILED (rc=1)" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "./build.log" in tar.getnames()
