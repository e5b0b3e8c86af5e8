"""Fork safety: after the op has run in a process, it runs in an os.fork() child of that
process (libgomp's thread team and MKL's threads do not survive fork: a parallel region
entered there waits for ever) and gives the parent's result bit for bit."""

import pytest
from helpers import run_python

# In a fresh interpreter: the op forward and backward at 2 threads, then fork; the child runs
# the same and writes its results, the parent waits at most 60 s for it and compares.
CODE = """
import os, sys, tempfile, time
import torch
from helpers import make_inputs
from rnnlm_ext import ops

torch.set_num_threads(2)
T, B, I, H = {shape}
inputs = make_inputs(T, B, I, H, torch.float32)

def run():
    out = ops.rnn_layer(*inputs, "tanh", False)
    return [out.detach(), *torch.autograd.grad(out, inputs, torch.ones_like(out))]

expected = run()
path = os.path.join(tempfile.mkdtemp(), "child.pt")
pid = os.fork()
if pid == 0:
    torch.save(run(), path)
    os._exit(0)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    sys.exit("the op hung in the forked child")
assert os.waitstatus_to_exitcode(status) == 0, status
got = torch.load(path)
assert all(torch.equal(g, e) for g, e in zip(got, expected)), "the child's result differs"
print("ok")
"""


# H = 64: the helper schedule in the parent; H = 1024: the loop's columns shared by 2 threads
@pytest.mark.parametrize("shape", [(8, 16, 8, 64), (3, 8, 8, 1024)])
def test_op_runs_in_a_forked_child(shape):
    assert run_python(CODE.format(shape=shape)).strip() == "ok"
