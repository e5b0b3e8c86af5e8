"""Benchmark of one recurrent layer: rnnlm_ext.RNN, LSTM or GRU against torch.nn's and the pure-Python loop.

Protocol: correctness is checked before any timing; every implementation is timed
side by side in one run (these machines are noisy, so only ratios from one run mean much);
median of repeated runs after warm-up; on the GPU, CUDA events with synchronisation. The
floor is the time the layer's GEMM FLOPs (6·T·B·G·H·(I+H) forward+backward, 2·T·B·G·H·(I+H)
forward, G gate blocks: 1 Elman, 4 LSTM, 3 GRU) take at the rate of a large matmul timed in
the same run; on the GPU the floor is the larger of that and the minimal memory traffic at the
bandwidth of a large copy. The pure-Python loop is the reference's for the Elman cell and a
loop over nn.LSTMCell / nn.GRUCell for the gated ones.

    rnnlm bench                      # CPU table, bench/results/rnn_cpu.{json,png}
    rnnlm bench --cell lstm          # the same for the LSTM: bench/results/lstm_cpu.{json,png}
    rnnlm bench --device cuda        # the GPU grid, each CUDA path of the fused layer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rnnlm_ext import GRU, LSTM, RNN, reference
from rnnlm_ext._files import check_writable

CPU_SHAPES = [(16, 64, 64), (16, 64, 256), (64, 64, 256), (64, 64, 1024), (256, 32, 128), (64, 256, 512)]
CUDA_T = 128
CUDA_BATCHES = [1, 8, 32, 64, 256]
CUDA_HIDDEN = [128, 256, 512, 1024, 2048]

# --cell -> (ours, torch.nn's, the torch.nn cell of the Python loop, gate blocks G)
CELLS = {
    "rnn": (RNN, nn.RNN, None, 1),
    "lstm": (LSTM, nn.LSTM, nn.LSTMCell, 4),
    "gru": (GRU, nn.GRU, nn.GRUCell, 3),
}
GATED_ACT = "sigmoid+tanh"  # what Row.nonlinearity holds for the gated cells


@dataclass
class Row:
    device: str
    dtype: str
    nonlinearity: str
    T: int
    B: int
    H: int
    pass_: str  # "fwd+bwd" or "fwd"
    ms: dict[str, float]  # implementation -> median milliseconds
    floor_ms: float
    cell: str = "rnn"  # rnn, lstm or gru

    @property
    def layer(self) -> str:
        """What tables and plots call the row's layer: the Elman cell's activation, else the cell."""
        return self.nonlinearity if self.cell == "rnn" else self.cell

    def ratio(self, slow: str, fast: str) -> float | None:
        return self.ms[slow] / self.ms[fast] if slow in self.ms and fast in self.ms else None


# ----------------------------------------------------------------------------------------
# timing


def median_ms(fn: Callable[[], None], device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gemm_gflops(device: str, dtype: torch.dtype, repeats: int) -> float:
    """The rate of a large square matmul: what the GEMMs of a layer could reach at best."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b, out=c), device, max(5, repeats // 4), 2)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def onednn_gflops(dtype: torch.dtype, repeats: int) -> float | None:
    """The CPU rate of the same matmul on oneDNN, which nn.LSTM's CPU kernel runs on, where
    torch.mm and our kernels run on the BLAS libtorch exports (MKL). The two differ by CPU:
    MKL takes slower code paths on non-Intel ones. None where torch has no oneDNN for dtype."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    n = 2048
    a = torch.randn(n, n).to_mkldnn()
    b = torch.randn(n, n).to_mkldnn()
    ms = median_ms(lambda: torch._C._nn.mkldnn_linear(a, b), "cpu", max(5, repeats // 4), 2)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_gbps(device: str, repeats: int) -> float:
    """Bandwidth of a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, max(5, repeats // 4), 2)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------
# the implementations, all holding the same weights


def implementations(H: int, nonlinearity: str, device: str, dtype: torch.dtype, python_loop: bool, cell: str = "rnn"):
    """Ours, torch.nn's (by its name, e.g. "nn.LSTM") and (python_loop) the pure-Python loop,
    by name, all with the same weights."""
    ours_cls, torch_cls, step_cls, _ = CELLS[cell]
    kwargs = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    fused = ours_cls(H, H, device=device, dtype=dtype, **kwargs)
    torch_layer = torch_cls(H, H, device=device, dtype=dtype, **kwargs)
    torch_layer.load_state_dict(fused.state_dict())
    impls = {"rnnlm_ext": fused, torch_name(cell): torch_layer}
    if python_loop and cell == "rnn":

        def loop(x, h0):
            out = reference.rnn_layer(
                x,
                h0[0],
                fused.weight_ih_l0,
                fused.weight_hh_l0,
                fused.bias_ih_l0 + fused.bias_hh_l0,
                nonlinearity,
            )
            return out, out[-1:]

        impls["python loop"] = loop
    elif python_loop:
        step = step_cls(H, H, device=device, dtype=dtype)
        step.load_state_dict({name.removesuffix("_l0"): p for name, p in fused.state_dict().items()})

        def loop(x, hx):  # one torch.nn cell call per step, autograd through every one
            state = (hx[0][0], hx[1][0]) if cell == "lstm" else hx[0]
            outs = []
            for x_t in x:
                state = step(x_t, state)
                outs.append(state[0] if cell == "lstm" else state)
            return torch.stack(outs), state

        impls["python loop"] = loop
    return impls


def torch_name(cell: str) -> str:
    """The name torch.nn's layer goes by in the results: nn.RNN, nn.LSTM, nn.GRU."""
    return "nn." + CELLS[cell][1].__name__


def initial_state(cell: str, h0):
    """hx for the cell from one [1,B,H] tensor: h0, or (h0, h0/2) as (h_0, c_0) for the LSTM."""
    return (h0, h0 * 0.5) if cell == "lstm" else h0


def cast(hx, dtype: torch.dtype):
    return tuple(h.to(dtype) for h in hx) if isinstance(hx, tuple) else hx.to(dtype)


def run_once(impl, x, h0, dout, backward: bool):
    if backward:
        out, _ = impl(x, h0)
        torch.autograd.backward(out, dout)
    else:
        with torch.no_grad():
            impl(x, h0)


def check(expected, impl, x, h0, dout, tol: float, grads: bool, label: str) -> None:
    """impl's output (and dx, with grads) against expected's (torch.nn's), before any timing."""
    results = []
    for module in (expected, impl):
        xg = x.detach().requires_grad_(grads)
        out, _ = module(xg, h0)
        results.append([("output", out)] + ([("dx", torch.autograd.grad(out, xg, dout)[0])] if grads else []))
    for (what, b), (_, a) in zip(*results):
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        if not err <= tol:
            raise AssertionError(
                f"{label}: {what} differs from nn.{type(expected).__name__}'s by {err:.2e} (> {tol:.0e})"
            )


def bench_shape(T, B, H, nonlinearity, device, dtype, repeats, warmup, python_loop, gflops, gbps, paths, cell="rnn"):
    from rnnlm_ext import ops  # the compiled op, loaded when timing starts (`rnnlm --help` works unbuilt)

    reference_name, G = torch_name(cell), CELLS[cell][3]
    others = implementations(H, nonlinearity, device, dtype, python_loop, cell)
    fused = others.pop("rnnlm_ext")
    # one entry per CUDA path of the fused layer (only "rnnlm_ext" on the CPU), then the others
    impls = {f"rnnlm_ext[{path}]" if path else "rnnlm_ext": fused for path in paths}
    impls.update(others)
    g = torch.Generator().manual_seed(T * B + H)
    x = torch.randn(T, B, H, generator=g).to(device, dtype)
    h0 = initial_state(cell, torch.randn(1, B, H, generator=g).to(device, dtype) * 0.5)
    dout = torch.randn(T, B, H, generator=g).to(device, dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2

    def under_path(name, fn):
        path = name[len("rnnlm_ext[") : -1] if name.startswith("rnnlm_ext[") else None
        if path is None:
            return fn()
        with ops.force_cuda_path(path):
            return fn()

    # Correctness first. In float64 the output and dx must equal torch.nn's to rounding. In the
    # timed dtype only the output is compared: with relu, a unit whose pre-activation rounds to
    # the other side of 0 flips its derivative, so two correct low-precision backwards can
    # differ in dx by O(|w_hh|).
    exact = implementations(H, nonlinearity, device, torch.float64, python_loop, cell)
    for name in impls:
        label = f"T={T} B={B} H={H} {nonlinearity if cell == 'rnn' else cell}: {name}"
        impl64 = exact["rnnlm_ext" if name.startswith("rnnlm_ext") else name]
        under_path(
            name,
            lambda: check(
                exact[reference_name],
                impl64,
                x.double(),
                cast(h0, torch.float64),
                dout.double(),
                1e-9,
                True,
                label + " float64",
            ),
        )
        under_path(
            name, lambda: check(impls[reference_name], impls[name], x, h0, dout, tol, False, label + f" {dtype}")
        )

    rows = []
    flops_fwd = 2 * T * B * G * H * (H + H)
    bytes_fwd = T * B * (H + H) * x.element_size()  # read x, write out
    for pass_, backward, flops, nbytes in (
        ("fwd+bwd", True, 3 * flops_fwd, 3 * bytes_fwd),
        ("fwd", False, flops_fwd, bytes_fwd),
    ):
        xg = x.detach().requires_grad_(backward)
        ms = {}
        for name, impl in impls.items():
            ms[name] = under_path(
                name, lambda: median_ms(lambda: run_once(impl, xg, h0, dout, backward), device, repeats, warmup)
            )
            for p in list(fused.parameters()) + list(impls[reference_name].parameters()) + [xg]:
                p.grad = None
        floor = flops / (gflops * 1e9) * 1e3
        if gbps:
            floor = max(floor, nbytes / (gbps * 1e9) * 1e3)
        rows.append(Row(device, str(dtype).replace("torch.", ""), nonlinearity, T, B, H, pass_, ms, floor, cell))
    return rows


# ----------------------------------------------------------------------------------------
# report


def markdown(rows: list[Row]) -> str:
    names, theirs = list(rows[0].ms), torch_name(rows[0].cell)
    fused_names = [n for n in names if n.startswith("rnnlm_ext")]
    first = "act" if rows[0].cell == "rnn" else "cell"
    head = [first, "pass", "dtype", "T", "B", "H"] + [f"{n} ms" for n in names] + ["floor ms"]
    head += [f"{theirs} ÷ {n}" for n in fused_names]
    if "python loop" in names:
        head += ["loop ÷ rnnlm_ext"]
    head += [f"{n} ÷ floor" for n in fused_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.layer, r.pass_, r.dtype, str(r.T), str(r.B), str(r.H)]
        cells += [f"{r.ms[n]:.3f}" for n in names] + [f"{r.floor_ms:.3f}"]
        cells += [f"{r.ratio(theirs, n):.2f}x" for n in fused_names]
        if "python loop" in names:
            cells += [f"{r.ratio('python loop', fused_names[0]):.2f}x"]
        cells += [f"{r.ms[n] / r.floor_ms:.2f}" for n in fused_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> bool:
    """Speed-up over torch.nn's layer per shape, one panel per (pass, activation, dtype). False, with
    nothing written, where matplotlib is not installed (the GPU machine may lack it)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused_names = [n for n in rows[0].ms if n.startswith("rnnlm_ext")]
    theirs = torch_name(rows[0].cell)
    groups = sorted({(r.pass_, r.nonlinearity, r.dtype) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8, 0.5 * len(rows)), 3.2 * len(groups)), squeeze=False)
    for ax, (pass_, act, dtype) in zip(axes[:, 0], groups):
        sel = [r for r in rows if (r.pass_, r.nonlinearity, r.dtype) == (pass_, act, dtype)]
        labels = [f"T{r.T}\nB{r.B}\nH{r.H}" for r in sel]
        width = 0.8 / len(fused_names)
        for i, name in enumerate(fused_names):
            xs = [k + i * width for k in range(len(sel))]
            ax.bar(xs, [r.ratio(theirs, name) for r in sel], width, label=f"{theirs} ÷ {name}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sel))], labels, fontsize=7)
        ax.set_ylabel(f"speed-up over {theirs}")
        ax.set_title(f"{pass_}, {sel[0].layer}, {dtype} ({sel[0].device})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_shapes(text: str):
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in text.split(";") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes takes 'T,B,H;T,B,H;...' (positive integers), got {text!r}")
    return shapes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags, on its own parser or on `rnnlm bench`."""
    cpu_grid = ";".join(",".join(map(str, shape)) for shape in CPU_SHAPES)
    p.add_argument("--cell", choices=list(CELLS), default="rnn", help="the layer: Elman RNN, LSTM or GRU")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the layers run")
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        help=f"'T,B,H;...' (I = H); unset: {cpu_grid} on the CPU, T={CUDA_T} with every B of "
        f"{','.join(map(str, CUDA_BATCHES))} and H of {','.join(map(str, CUDA_HIDDEN))} on the GPU",
    )
    p.add_argument(
        "--nonlinearity",
        choices=[*reference.NONLINEARITIES, "both"],
        default=None,
        help="the Elman cell's activation (cell rnn); unset: both on the CPU, tanh on the GPU",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated, of float32, float64 (CPU and GPU), bfloat16, float16 (GPU); "
        "unset: float32 on the CPU, float32,bfloat16 on the GPU",
    )
    p.add_argument("--repeats", type=int, default=25, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before them")
    p.add_argument("--no-python-loop", action="store_true", help="skip the pure-Python loop")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for the JSON and PNG")


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(
        prog="rnnlm bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_arguments(p)
    return run(p.parse_args(argv), p.error)


def run(args: argparse.Namespace, error: Callable[[str], None]) -> list[Row]:
    """Check the flags (error(message) for a bad one), time every shape, print and write the results."""
    from rnnlm_ext import ops  # the compiled op, loaded when timing starts (`rnnlm --help` works unbuilt)

    if args.repeats < 1 or args.warmup < 0:
        error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        error("--device cuda: torch sees no CUDA device here")
    cuda = args.device == "cuda"
    gated = args.cell != "rnn"
    if gated and args.nonlinearity is not None:
        error(f"--nonlinearity is the Elman cell's (--cell rnn); --cell {args.cell} has its own gates")
    allowed = ["float32", "float64"] + (["bfloat16", "float16"] if cuda else [])
    names = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    if not names or any(n not in allowed for n in names):
        error(f"--dtypes takes a comma-separated list of {', '.join(allowed)} on {args.device}, got {args.dtypes!r}")
    try:
        check_writable(args.out, "--out")
    except ValueError as err:
        error(str(err))

    shapes = args.shapes or ([(CUDA_T, b, h) for h in CUDA_HIDDEN for b in CUDA_BATCHES] if cuda else CPU_SHAPES)
    every = list(reference.NONLINEARITIES)
    acts = {"both": every, None: ["tanh"] if cuda else every}.get(args.nonlinearity, [args.nonlinearity])
    if gated:
        acts = [GATED_ACT]
    dtypes = [getattr(torch, n) for n in names]
    python_loop = not args.no_python_loop and not cuda

    rows: list[Row] = []
    rates: dict[str, dict[str, float | None]] = {}
    for dtype in dtypes:
        gflops = gemm_gflops(args.device, dtype, args.repeats)
        gbps = copy_gbps(args.device, args.repeats) if cuda else 0.0
        onednn = None if cuda else onednn_gflops(dtype, args.repeats)
        rates[str(dtype)] = {"matmul_gflops": gflops, "onednn_gflops": onednn, "copy_gbps": gbps or None}
        print(
            f"# {args.device} {dtype}: matmul {gflops:.0f} GFLOP/s"
            + (f" (oneDNN: {onednn:.0f})" if onednn else "")
            + (f", copy {gbps:.0f} GB/s" if gbps else ""),
            flush=True,
        )
        for act in acts:
            for T, B, H in shapes:
                paths = [None]
                if cuda and gated:
                    paths = ["per_step"]  # the LSTM and GRU have no persistent kernel
                elif cuda:
                    paths = [pth for pth in ops.CUDA_PATHS if ops.cuda_path(B, H, dtype, pth) == pth]
                rows += bench_shape(
                    T,
                    B,
                    H,
                    act,
                    args.device,
                    dtype,
                    args.repeats,
                    args.warmup,
                    python_loop,
                    gflops,
                    gbps,
                    paths,
                    args.cell,
                )
                last = rows[-2:]
                print(
                    "  "
                    + "  ".join(
                        f"{r.pass_} T={T} B={B} H={H} {act}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in r.ms.items())
                        for r in last
                    ),
                    flush=True,
                )

    table = markdown(rows)
    print()
    print(table)
    stem = os.path.join(args.out, f"{args.cell}_{args.device}")
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": torch.cuda.get_device_name() if cuda else cpu_model(),
        "rates": rates,
        "build_info": ops.build_info(),
        "repeats": args.repeats,
    }
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    plotted = plot(rows, stem + ".png")
    print(
        f"\nwrote {stem}.json"
        + (f" and {stem}.png" if plotted else " (no PNG: `pip install 'rnnlm_ext[plot]'` for one)")
    )
    return rows


if __name__ == "__main__":
    main()
