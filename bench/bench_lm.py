"""Language-model results: fastbook chapter 12's table (LMModel1-7) side by side with RNNLM,
training throughput of RNNLM on each fused cell vs its torch.nn twin vs the Python-loop
reference, and tiny-shakespeare at character level on both layers of each cell.

Prints markdown tables; writes OUT/bench_lm.json and the loss-curve plots OUT/*.png.
    python bench/bench_lm.py                     # everything
    python bench/bench_lm.py --sections throughput --repeats 7
    python bench/bench_lm.py --quick --out /tmp/smoke   # every section, one short epoch each: does it run
    RNNLM_EXT_DATA=../shared/data python bench/bench_lm.py   # tiny-shakespeare from that copy, no download
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from rnnlm_ext.lm import data, models
from rnnlm_ext.lm.train import RUN_FIELDS, TrainConfig, make_optimizer, resolve, train

HERE = os.path.dirname(os.path.abspath(__file__))

BOOK_RNNLM = dict(hidden_size=64, layers=1, clip=0.0, lr=3e-3)  # LMModel4's setup, on RNNLM
RECIPE = dict(  # ours: RNNLM on the fused GRU with AWD-LSTM's regularisers, still 15 epochs
    cell="gru",
    hidden_size=128,
    layers=2,
    output_drop=0.4,
    hidden_drop=0.2,
    weight_drop=0.2,
    ar=2.0,
    tar=1.0,
    lr=1e-2,
    wd=0.1,
    clip=0.0,
)
SEEDS = (42, 43, 44)
# fastbook chapter 12 (hidden 64, bs 64, fit_one_cycle): each model's own settings are
# `rnnlm train --model lmmodelN`'s defaults, the book's (rnnlm_ext.lm.train.MODEL_DEFAULTS).
# (name, settings, the book's last-epoch valid accuracy, seeds)
FASTBOOK = [
    ("LMModel1", dict(model="lmmodel1"), 0.494, (42,)),
    ("LMModel2", dict(model="lmmodel2"), 0.470, (42,)),
    ("LMModel3", dict(model="lmmodel3"), 0.589, (42,)),
    ("LMModel4", dict(model="lmmodel4"), 0.640, (42,)),
    ("RNNLM, shared-weight cell on the fused op (= LMModel4)", dict(model="shared", **BOOK_RNNLM), 0.640, (42,)),
    ("RNNLM, fused Elman layer", dict(model="rnn", **BOOK_RNNLM), None, (42,)),
    ("LMModel5 (2-layer RNN, fused)", dict(model="lmmodel5"), 0.488, (42,)),
    ("LMModel6 (2-layer LSTM, fused)", dict(model="lmmodel6"), 0.758, SEEDS),
    ("LMModel7 (LSTM, dropout, AR, TAR, tied; fused)", dict(model="lmmodel7"), 0.869, SEEDS),
    ("ours: RNNLM, fused GRU h128 x2, AWD regularisers", RECIPE, None, SEEDS),
]


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


def _setup_text(c: dict) -> str:
    """A run's settings in a table cell: 'lstm h64 x2, sl 16, 15 ep, lr 0.01, wd 0.1, dropout 0.4, AR 2, TAR 1'."""
    text = (
        f"{c['cell']} h{c['hidden_size']} x{c['layers']}"
        if c["model"] == "rnn" or c["model"] in models.STACK_MODELS
        else f"h{c['hidden_size']}"
    )
    text += f", sl {c['bptt']}, {c['epochs']} ep, lr {c['lr']:g}, wd {c['wd']:g}"
    for key, label in (
        ("clip", "clip"),
        ("dropout", "dropout"),
        ("embed_drop", "embed drop"),
        ("input_drop", "input drop"),
        ("hidden_drop", "hidden drop"),
        ("output_drop", "output drop"),
        ("weight_drop", "weight drop"),
        ("ar", "AR"),
        ("tar", "TAR"),
    ):
        text += f", {label} {c[key]:g}" if c[key] else ""
    text += ", tied" if c["tie_weights"] else ""
    text += f", moms {c['moms']}" if c["moms"] != "0.95,0.85" else ""
    return text


def run_fastbook(results: dict, epochs: int | None = None, one_seed: bool = False) -> None:
    """Every row of FASTBOOK (and `rnnlm train`'s defaults) with its seeds; --quick cuts every
    row to `epochs` and its first seed."""
    rows = []
    for name, setup, book, seeds in [*FASTBOOK, ("RNNLM, `rnnlm train`'s defaults", {}, None, (42,))]:
        runs = []
        for seed in seeds[:1] if one_seed else seeds:
            cfg = resolve(TrainConfig(**setup, seed=seed, progress=False, **({"epochs": epochs} if epochs else {})))
            t0 = time.perf_counter()
            r = train(cfg, log=quiet)
            runs.append(dict(seed=seed, time_s=time.perf_counter() - t0, **r["final"]))
        accuracies = [run["valid_accuracy"] for run in runs]
        row = dict(
            name=name,
            book=book,
            config={k: v for k, v in dataclasses.asdict(cfg).items() if k in RUN_FIELDS and k != "seed"},
            runs=runs,
            valid_accuracy=statistics.median(accuracies),
            accuracy_range=[min(accuracies), max(accuracies)],
            valid_loss=statistics.median(run["valid_loss"] for run in runs),
            time_s=statistics.median(run["time_s"] for run in runs),
        )
        if cfg.bptt == 3:
            row["book_pipeline_accuracy"] = fastbook_windows(cfg.model, cfg.epochs, cfg.lr)
        rows.append(row)
        print(f"  {name}: accuracy {row['valid_accuracy']:.3f} ({len(runs)} seeds) in {row['time_s']:.1f}s", flush=True)
    results["fastbook"] = rows
    print(
        "\n| model | setup | book | book's pipeline, here | in-order stream (`rnnlm train`): median [range] of seeds "
        "| valid loss | time |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        book = f"{r['book']:.3f}" if r["book"] is not None else "–"
        pipeline = f"{r['book_pipeline_accuracy']:.3f}" if "book_pipeline_accuracy" in r else "(same as right)"
        lo, hi = r["accuracy_range"]
        accuracy = f"{r['valid_accuracy']:.3f}" + (
            f" [{lo:.3f}, {hi:.3f}] ({len(r['runs'])} seeds)" if len(r["runs"]) > 1 else ""
        )
        print(
            f"| {r['name']} | {_setup_text(r['config'])} | {book} | {pipeline} | {accuracy} | {r['valid_loss']:.3f} "
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


def run_throughput(results: dict, repeats: int, cells: list[str], row_tokens: int | None = None) -> None:
    """Same model, same batches, each cell on three layers (fused, torch.nn, the reference's loop),
    timed in turn (interleaved) `repeats` times; row_tokens: only that much of each row (--quick)."""
    corpus = data.load_corpus("human-numbers")
    rows = data.batchify(corpus.train, 64)[:, :row_tokens]
    main_job = resolve(TrainConfig())
    setups = [
        ("fastbook size: h64 x2, bs 64, sl 16", dict(hidden_size=64, layers=2)),
        (
            f"`rnnlm train`'s size: h{main_job.hidden_size} x{main_job.layers}, bs 64, sl 16",
            dict(hidden_size=main_job.hidden_size, layers=main_job.layers),
        ),
    ]
    out = []
    for cell in cells:
        fused_cls = models.layer_class("fused", cell)
        layers = {
            "fused": fused_cls,
            "torch": models.layer_class("torch", cell),
            "reference": functools.partial(fused_cls, impl="reference"),
        }
        for label, size in setups:
            built = {}
            for impl, layer_cls in layers.items():
                torch.manual_seed(0)  # the same weights on all three
                built[impl] = models.RNNLM(
                    len(corpus.vocab), size["hidden_size"], size["layers"], "relu", cell=cell, layer_cls=layer_cls
                )
            speeds = {impl: [] for impl in built}
            for rep in range(repeats + 1):  # the first round warms up and is not counted
                for impl, model in built.items():
                    tps = _epoch_tokens_per_s(model, rows, 16)
                    if rep:
                        speeds[impl].append(tps)
            med = {impl: statistics.median(v) for impl, v in speeds.items()}
            out.append(
                dict(
                    cell=cell,
                    setup=label,
                    tokens_per_s=med,
                    all_runs=speeds,
                    fused_over_torch=med["fused"] / med["torch"],
                    fused_over_reference=med["fused"] / med["reference"],
                )
            )
            print(f"  {cell}, {label}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in med.items()), flush=True)
    results["throughput"] = out
    print(
        f"\n| cell | setup (train, median of {repeats} epochs each) | fused tok/s | torch.nn tok/s | reference tok/s "
        "| fused ÷ torch.nn | fused ÷ reference |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in out:
        t = r["tokens_per_s"]
        print(
            f"| {r['cell']} | {r['setup']} | {t['fused']:,.0f} | {t['torch']:,.0f} | {t['reference']:,.0f} "
            f"| {r['fused_over_torch']:.2f}x | {r['fused_over_reference']:.2f}x |"
        )


SHAKESPEARE = dict(hidden_size=256, layers=2, bptt=64, bs=64, lr=3e-3, dropout=0.1)
LAYER_NAMES = {"fused": "rnnlm_ext.{}", "torch": "torch.nn.{}"}


def run_shakespeare(results: dict, dataset: str, epochs: int, out_dir: str, cells: list[str]) -> None:
    """Each cell, fused and torch.nn, same seed and settings; one loss-curve plot per cell."""
    by_cell = {}
    for cell in cells:
        runs = {}
        for impl in ("fused", "torch"):
            cfg = TrainConfig(
                dataset=dataset, level="char", rnn=impl, cell=cell, epochs=epochs, progress=False, **SHAKESPEARE
            )
            t0 = time.perf_counter()
            r = train(cfg, log=quiet)
            runs[impl] = dict(time_s=time.perf_counter() - t0, epochs=r["epochs"], **r["final"])
            print(
                f"  {cell} {impl}: valid loss {r['final']['valid_loss']:.4f} nats/char in {runs[impl]['time_s']:.0f}s",
                flush=True,
            )
        by_cell[cell] = runs
        _plot(runs, models.CELLS[cell], os.path.join(out_dir, f"shakespeare_{cell}_loss.png"))
    results["shakespeare"] = dict(config=dict(epochs=epochs, **SHAKESPEARE), runs=by_cell)
    print(
        "\n| tiny-shakespeare, char level (h256 x2, sl 64, bs 64) | valid loss (nats/char) | perplexity "
        "| tokens/s | time |"
    )
    print("|---|---|---|---|---|")
    for cell, runs in by_cell.items():
        for impl, r in runs.items():
            name = LAYER_NAMES[impl].format(models.CELLS[cell])
            loss, ppl, speed = f"{r['valid_loss']:.4f}", f"{r['perplexity']:.3f}", f"{r['tokens_per_s']:,.0f}"
            print(f"| {name} | {loss} | {ppl} | {speed} | {r['time_s']:.0f}s |")


def _plot(runs: dict, layer: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, r in runs.items():
        name = LAYER_NAMES[impl].format(layer)
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
    p.add_argument("--cells", default="rnn,lstm,gru", help="comma-separated cells of throughput and shakespeare")
    p.add_argument("--repeats", type=int, default=5, help="timed training epochs per layer (throughput)")
    p.add_argument(
        "--shakespeare",
        default="tiny-shakespeare",
        help="the data set of the char-level section: tiny-shakespeare (from $RNNLM_EXT_DATA, else "
        "~/.cache/rnnlm_ext, downloaded there once), or a text file",
    )
    p.add_argument("--shakespeare-epochs", type=int, default=2)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one seed, one epoch per row, one timed repeat of 10 batches, the first 200,000 "
        "characters of tiny-shakespeare (numbers not comparable to the full run's)",
    )
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON and PNG files")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train() does, for the throughput section that does not call it
    os.makedirs(args.out, exist_ok=True)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}
    sections = args.sections.split(",")
    unknown = set(sections) - {"fastbook", "throughput", "shakespeare"}
    if unknown:
        p.error(f"--sections: unknown {', '.join(sorted(unknown))}")
    cells = args.cells.split(",")
    if set(cells) - set(models.CELLS):
        p.error(f"--cells: unknown {', '.join(sorted(set(cells) - set(models.CELLS)))}")
    if "shakespeare" in sections:
        try:  # fetched, or refused, now rather than after the other sections
            corpus_text = data.load_corpus(args.shakespeare, "char")
        except (ValueError, FileNotFoundError) as err:
            p.error(f"--shakespeare: {err}")
    if args.quick:
        args.repeats, args.shakespeare_epochs = 1, 1
        if "shakespeare" in sections:
            head = os.path.join(args.out, "shakespeare_head.txt")
            with open(head, "w") as f:
                f.write("".join(corpus_text.vocab.decode(corpus_text.train[:200_000])))
            args.shakespeare = head
    if "fastbook" in sections:
        print("fastbook chapter 12 on Human Numbers, side by side")
        run_fastbook(results, epochs=1 if args.quick else None, one_seed=args.quick)
    if "throughput" in sections:
        print("\ntraining throughput of RNNLM on Human Numbers")
        run_throughput(results, args.repeats, cells, row_tokens=160 if args.quick else None)
    if "shakespeare" in sections:
        print("\ntiny-shakespeare, character level")
        run_shakespeare(results, args.shakespeare, args.shakespeare_epochs, args.out, cells)
    path = os.path.join(args.out, "bench_lm.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
