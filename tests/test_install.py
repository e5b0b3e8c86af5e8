"""Packaging: one version everywhere, and an extension that refuses a torch it was not built for."""

import os
import re
import subprocess
import sys

import pytest
import torch
from setuptools.config.pyprojecttoml import read_configuration

import rnnlm_ext
from rnnlm_ext import _extension, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_metadata_is_the_package_version():
    # the wheel's metadata takes its version from pyproject.toml, which reads rnnlm_ext/_version.py
    project = read_configuration(os.path.join(ROOT, "pyproject.toml"))["project"]
    assert project["version"] == rnnlm_ext.__version__, (project["version"], rnnlm_ext.__version__)


@pytest.mark.parametrize(
    "built, running", [("2.13.0", "2.13.0+cpu"), ("2.11.0", "2.11.0a0+gitabc"), ("2.14.1", "2.14.1")]
)
def test_same_torch_release_is_accepted(built, running):
    _extension.check_torch_version(built, running)


@pytest.mark.parametrize("built, running", [("2.12.0", "2.13.0+cpu"), ("2.13.0", "2.13.1"), ("2.13.0", "3.13.0")])
def test_another_torch_release_is_refused_with_how_to_rebuild(built, running):
    message = re.escape(f"built against torch {built}, but torch {running} is running") + ".*rebuild"
    with pytest.raises(RuntimeError, match=message):
        _extension.check_torch_version(built, running)


def _import_in_subprocess(prelude: str) -> subprocess.CompletedProcess:
    code = prelude + "\nimport rnnlm_ext\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_under_another_torch_says_to_rebuild():
    # the running torch reports another release than the one the extension was compiled against
    result = _import_in_subprocess("import torch\ntorch.__version__ = '2.99.0'")
    assert result.returncode != 0, result.stdout
    built = ops.build_info()["torch_version"]
    assert f"built against torch {built}, but torch 2.99.0 is running" in result.stderr, result.stderr
    assert "pip install --no-build-isolation ." in result.stderr, result.stderr


def test_extension_that_fails_to_load_says_to_rebuild():
    # the loader fails as it does on a library whose torch symbols are missing from this torch
    prelude = (
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'rnnlm_ext._C':\n"
        "            raise ImportError('undefined symbol: _ZN3c104impl3fooEv')\n"
        "sys.meta_path.insert(0, Broken())"
    )
    result = _import_in_subprocess(prelude)
    assert result.returncode != 0, result.stdout
    assert "does not load under torch" in result.stderr and "undefined symbol" in result.stderr, result.stderr
    assert "pip install --no-build-isolation ." in result.stderr, result.stderr


def test_build_without_torch_stops_at_once_and_says_no_build_isolation():
    # as in pip's isolated build environment, where the installed torch is out of sight
    code = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None\n"
        "sys.argv = ['setup.py', '--version']\n"
        "runpy.run_path('setup.py')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pip install --no-build-isolation ." in result.stderr, result.stderr


SMOKE = """
import importlib.metadata, sys
import torch
import rnnlm_ext
from rnnlm_ext import ops

assert rnnlm_ext.__file__.startswith(sys.prefix), rnnlm_ext.__file__  # the installed copy, not the tree
assert importlib.metadata.version("rnnlm_ext") == rnnlm_ext.__version__
assert ops.build_info()["torch_version"] == torch.__version__.split("+")[0], ops.build_info()
torch.manual_seed(0)
ref = torch.nn.RNN(5, 7, num_layers=2, dtype=torch.float64)
ours = rnnlm_ext.RNN(5, 7, num_layers=2, dtype=torch.float64)
ours.load_state_dict(ref.state_dict())
x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
outs = [rnn(x) for rnn in (ref, ours)]
grads = [
    torch.autograd.grad(out.sum() + h_n.sum(), [x, *rnn.parameters()]) for (out, h_n), rnn in zip(outs, (ref, ours))
]
for a, b in zip([*outs[0], *grads[0]], [*outs[1], *grads[1]]):
    assert (a - b).abs().max().item() < 1e-10, (a - b).abs().max().item()
print("smoke ok")
"""


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_tree(tmp_path):
    """pip wheel, then a venv with only torch (the torch this was built with) and the wheel."""

    def run(*args, cwd=tmp_path, timeout=600):
        result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", dist, ROOT)
    (wheel,) = dist.glob("rnnlm_ext-*.whl")
    assert wheel.name.startswith(f"rnnlm_ext-{rnnlm_ext.__version__}-"), wheel.name

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    run(py, "-m", "pip", "install", "--quiet", f"torch=={torch.__version__}")
    run(py, "-m", "pip", "install", "--quiet", "--no-deps", wheel)
    assert "smoke ok" in run(py, "-c", SMOKE).stdout
    assert "tqdm" not in run(py, "-m", "pip", "list").stdout  # the layer alone needs torch only

    run(py, "-m", "pip", "install", "--quiet", f"{wheel}[lm]")  # the rnnlm command wants the lm extra
    help_text = run(venv / "bin" / "rnnlm", "--help").stdout
    assert all(command in help_text for command in ("train", "generate", "bench")), help_text

    # a plain `pip install .` (isolated build) stops before compiling and says what to add
    isolated = subprocess.run(
        [py, "-m", "pip", "install", ROOT], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert isolated.returncode != 0 and "--no-build-isolation" in isolated.stdout + isolated.stderr, isolated.stderr
    assert "smoke ok" in run(py, "-c", SMOKE).stdout  # and leaves the installed wheel working
