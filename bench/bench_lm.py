"""Language-model results: fastbook chapter 12's table side by side with RNNLM, training
throughput of RNNLM on rnnlm_ext.RNN vs torch.nn.RNN vs the Python-loop reference, and
tiny-shakespeare at character level with both layers.

Prints markdown tables; writes OUT/bench_lm.json and the loss-curve plots OUT/*.png.
    python bench/bench_lm.py                     # everything
    python bench/bench_lm.py --sections throughput --repeats 7
    RNNLM_EXT_DATA=../shared/data python bench/bench_lm.py   # tiny-shakespeare from that copy, no download
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from rnnlm_ext import RNN
from rnnlm_ext.lm import data, models
from rnnlm_ext.lm.train import TrainConfig, make_optimizer, train

HERE = os.path.dirname(os.path.abspath(__file__))

# fastbook chapter 12: hidden 64, bs 64, fit_one_cycle; valid accuracy of the last epoch in the book
FASTBOOK = [
    ("LMModel1", dict(model="lmmodel1", bptt=3, epochs=4, lr=1e-3), 0.494),
    ("LMModel2", dict(model="lmmodel2", bptt=3, epochs=4, lr=1e-3), 0.470),
    ("LMModel3", dict(model="lmmodel3", bptt=3, epochs=10, lr=3e-3), 0.589),
    ("LMModel4", dict(model="lmmodel4", bptt=16, epochs=15, lr=3e-3), 0.640),
    (
        "RNNLM, shared-weight cell on the fused op (= LMModel4)",
        dict(model="shared", bptt=16, epochs=15, lr=3e-3),
        0.640,
    ),
    ("RNNLM, fused Elman layer", dict(model="rnn", bptt=16, epochs=15, lr=3e-3), None),
]
BOOK_SETUP = dict(hidden_size=64, layers=1, bs=64, clip=0.0, dropout=0.0)  # fastai's Learner: no clipping


def quiet(_):
    pass


def fastbook_windows(name: str, epochs: int, lr: float, seed: int = 42) -> float:
    """The book's own pipeline for the three-token models: windows x = nums[i:i+3], y = nums[i+3]
    (i a multiple of 3), the first 80% of windows for training, batches of 64 consecutive windows
    (LMModel1/2) or fastbook's group_chunks (LMModel3, stateful). Returns the last valid accuracy."""
    torch.manual_seed(seed)
    corpus = data.load_corpus("human-numbers")
    nums = torch.cat([corpus.train, corpus.valid])
    starts = torch.arange(0, len(nums) - 4, 3)
    X, Y = torch.stack([nums[starts + k] for k in range(3)], 1), nums[starts + 3]  # [N,3], [N]
    cut = int(len(X) * 0.8)
    model = models.build_model(name, len(corpus.vocab), 64)
    stateful = hasattr(model, "reset")

    def order(lo: int, hi: int) -> torch.Tensor:  # group_chunks: row j continues across batches
        idx = torch.arange(lo, hi)
        if not stateful:
            return idx
        m = len(idx) // 64
        return idx[: m * 64].view(64, m).T.reshape(-1)

    train_idx, valid_idx = order(0, cut), order(cut, len(X))
    n_batches = -(-len(train_idx) // 64)
    opt, sched = make_optimizer(model.parameters(), lr, 0.01, epochs * n_batches)
    for _ in range(epochs):
        models.reset_state(model)
        for b in train_idx.split(64):
            loss = F.cross_entropy(model(X[b]), Y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    models.reset_state(model)
    with torch.no_grad():
        correct = sum((model(X[b]).argmax(-1) == Y[b]).sum().item() for b in valid_idx.split(64))
    return correct / len(valid_idx)


def run_fastbook(results: dict) -> None:
    rows = []
    for name, setup, book in [*FASTBOOK, ("RNNLM, `rnnlm train`'s defaults", {}, None)]:
        cfg = TrainConfig(**({**BOOK_SETUP, **setup} if setup else {}), progress=False)
        t0 = time.perf_counter()
        r = train(cfg, log=quiet)
        row = dict(
            name=name,
            book=book,
            config={
                k: getattr(cfg, k)
                for k in ("model", "hidden_size", "layers", "bptt", "epochs", "lr", "dropout", "clip")
            },
            time_s=time.perf_counter() - t0,
            **r["final"],
        )
        if cfg.bptt == 3:
            row["book_pipeline_accuracy"] = fastbook_windows(cfg.model, cfg.epochs, cfg.lr)
        rows.append(row)
        print(f"  {name}: accuracy {r['final']['valid_accuracy']:.3f} in {row['time_s']:.1f}s", flush=True)
    results["fastbook"] = rows
    print("\n| model | setup | book | book's pipeline, here | in-order stream (`rnnlm train`) | valid loss | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        setup = f"h{c['hidden_size']} x{c['layers']}, sl {c['bptt']}, {c['epochs']} ep, lr {c['lr']:g}"
        setup += f", clip {c['clip']:g}" if c["clip"] else ""
        setup += f", dropout {c['dropout']:g}" if c["dropout"] else ""
        book = f"{r['book']:.3f}" if r["book"] is not None else "–"
        pipeline = f"{r['book_pipeline_accuracy']:.3f}" if "book_pipeline_accuracy" in r else "(same as right)"
        print(
            f"| {r['name']} | {setup} | {book} | {pipeline} | {r['valid_accuracy']:.3f} | {r['valid_loss']:.3f} "
            f"| {r['time_s']:.1f}s |"
        )


def _epoch_tokens_per_s(model, rows: torch.Tensor, bptt: int) -> float:
    """One training epoch (forward, backward, AdamW step) over rows [B,L]; tokens per second."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    models.reset_state(model)
    n, t0 = 0, time.perf_counter()
    for x, y in data.batches(rows, bptt):
        loss = F.cross_entropy(model(x).reshape(-1, model.h_o.out_features), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += x.numel()
    return n / (time.perf_counter() - t0)


def run_throughput(results: dict, repeats: int) -> None:
    """Same model, same batches, three recurrent layers, timed in turn (interleaved) `repeats` times."""
    corpus = data.load_corpus("human-numbers")
    rows = data.batchify(corpus.train, 64)
    default = TrainConfig()
    setups = [
        ("fastbook size: h64 x1, bs 64, sl 16", dict(hidden_size=64, layers=1)),
        (
            f"`rnnlm train`'s size: h{default.hidden_size} x{default.layers}, bs 64, sl 16",
            dict(hidden_size=default.hidden_size, layers=default.layers),
        ),
    ]
    out = []
    for label, size in setups:
        built = {}
        # the same weights (one seed) on rnnlm_ext.RNN, nn.RNN and rnnlm_ext.RNN running the reference's loop
        layers = {"fused": RNN, "torch": torch.nn.RNN, "reference": functools.partial(RNN, impl="reference")}
        for impl, rnn_cls in layers.items():
            torch.manual_seed(0)
            built[impl] = models.RNNLM(len(corpus.vocab), size["hidden_size"], size["layers"], "relu", rnn_cls=rnn_cls)
        speeds = {impl: [] for impl in built}
        for rep in range(repeats + 1):  # the first round warms up and is not counted
            for impl, model in built.items():
                tps = _epoch_tokens_per_s(model, rows, 16)
                if rep:
                    speeds[impl].append(tps)
        med = {impl: statistics.median(v) for impl, v in speeds.items()}
        out.append(
            dict(
                setup=label,
                tokens_per_s=med,
                all_runs=speeds,
                fused_over_torch=med["fused"] / med["torch"],
                fused_over_reference=med["fused"] / med["reference"],
            )
        )
        print(f"  {label}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in med.items()), flush=True)
    results["throughput"] = out
    print(
        f"\n| setup (train, median of {repeats} epochs each) | fused tok/s | nn.RNN tok/s | reference tok/s "
        "| fused ÷ nn.RNN | fused ÷ reference |"
    )
    print("|---|---|---|---|---|---|")
    for r in out:
        t = r["tokens_per_s"]
        print(
            f"| {r['setup']} | {t['fused']:,.0f} | {t['torch']:,.0f} | {t['reference']:,.0f} "
            f"| {r['fused_over_torch']:.2f}x | {r['fused_over_reference']:.2f}x |"
        )


def run_shakespeare(results: dict, dataset: str, epochs: int, out_dir: str) -> None:
    runs = {}
    for impl in ("fused", "torch"):
        cfg = TrainConfig(
            dataset=dataset,
            level="char",
            rnn=impl,
            hidden_size=256,
            layers=2,
            bptt=64,
            bs=64,
            epochs=epochs,
            lr=3e-3,
            dropout=0.1,
            progress=False,
        )
        t0 = time.perf_counter()
        r = train(cfg, log=quiet)
        runs[impl] = dict(time_s=time.perf_counter() - t0, epochs=r["epochs"], **r["final"])
        print(
            f"  {impl}: valid loss {r['final']['valid_loss']:.4f} nats/char in {runs[impl]['time_s']:.0f}s", flush=True
        )
    results["shakespeare"] = dict(
        config=dict(hidden_size=256, layers=2, bptt=64, bs=64, epochs=epochs, lr=3e-3, dropout=0.1), runs=runs
    )
    print(
        "\n| tiny-shakespeare, char level (h256 x2, sl 64, bs 64) | valid loss (nats/char) | perplexity "
        "| tokens/s | time |"
    )
    print("|---|---|---|---|---|")
    for impl, r in runs.items():
        name = "rnnlm_ext.RNN" if impl == "fused" else "torch.nn.RNN"
        loss, ppl, speed = f"{r['valid_loss']:.4f}", f"{r['perplexity']:.3f}", f"{r['tokens_per_s']:,.0f}"
        print(f"| {name} | {loss} | {ppl} | {speed} | {r['time_s']:.0f}s |")
    _plot(runs, os.path.join(out_dir, "shakespeare_loss.png"))


def _plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, r in runs.items():
        name = "rnnlm_ext.RNN" if impl == "fused" else "torch.nn.RNN"
        losses = [v for e in r["epochs"] for v in e["step_losses"]]
        per_step = sum(e["train_time"] for e in r["epochs"]) / len(losses)
        smooth = [sum(losses[max(0, i - 19) : i + 1]) / len(losses[max(0, i - 19) : i + 1]) for i in range(len(losses))]
        steps_per_epoch = len(r["epochs"][0]["step_losses"])
        valid_steps = [steps_per_epoch * e["epoch"] for e in r["epochs"]]
        valid = [e["valid_loss"] for e in r["epochs"]]
        (line,) = by_step.plot(smooth, label=f"{name} train")
        by_step.plot(valid_steps, valid, "o--", color=line.get_color(), label=f"{name} valid")
        by_time.plot([per_step * (i + 1) for i in range(len(smooth))], smooth, color=line.get_color(), label=name)
    by_step.set(xlabel="step", ylabel="loss (nats/char)", title="tiny-shakespeare, char level")
    by_time.set(xlabel="training time (s)", ylabel="train loss (nats/char)", title="same runs against time")
    for ax in (by_step, by_time):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sections",
        default="fastbook,throughput,shakespeare",
        help="comma-separated: fastbook, throughput, shakespeare",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed training epochs per layer (throughput)")
    p.add_argument(
        "--shakespeare",
        default="tiny-shakespeare",
        help="the data set of the char-level section: tiny-shakespeare (from $RNNLM_EXT_DATA, else "
        "~/.cache/rnnlm_ext, downloaded there once), or a text file",
    )
    p.add_argument("--shakespeare-epochs", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON and PNG files")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train() does, for the throughput section that does not call it
    os.makedirs(args.out, exist_ok=True)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    sections = args.sections.split(",")
    unknown = set(sections) - {"fastbook", "throughput", "shakespeare"}
    if unknown:
        p.error(f"--sections: unknown {', '.join(sorted(unknown))}")
    if "shakespeare" in sections:
        try:  # fetched, or refused, now rather than after the other sections
            data.load_corpus(args.shakespeare, "char")
        except (ValueError, FileNotFoundError) as err:
            p.error(f"--shakespeare: {err}")
    if "fastbook" in sections:
        print("fastbook chapter 12 on Human Numbers, side by side")
        run_fastbook(results)
    if "throughput" in sections:
        print("\ntraining throughput of RNNLM on Human Numbers")
        run_throughput(results, args.repeats)
    if "shakespeare" in sections:
        print("\ntiny-shakespeare, character level")
        run_shakespeare(results, args.shakespeare, args.shakespeare_epochs, args.out)
    path = os.path.join(args.out, "bench_lm.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
