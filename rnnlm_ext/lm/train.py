"""Training: stateful truncated BPTT with AdamW and one-cycle, metrics, atomic checkpoints, exact resume, DDP.

Dimension letters: B batch rows (per process), T steps (bptt), V vocabulary.
One epoch reads every train row left to right in bptt chunks; the model carries its hidden
state from chunk to chunk (detached) and starts from zeros at the start of every epoch and
before validation. Under torchrun, each process reads its own B rows of the stream.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rnnlm_ext._files import check_writable
from rnnlm_ext.lm import data, models
from rnnlm_ext.rnn import RNN

CHECKPOINT = "checkpoint.pt"
RNN_CLASSES = {"fused": RNN, "torch": nn.RNN}


@dataclass
class TrainConfig:
    dataset: str = "human-numbers"  # 'human-numbers' or a text file / folder of .txt files
    level: str = "word"  # 'word' or 'char' tokens
    min_freq: int = 1  # rarer tokens become <unk> (text data sets)
    max_vocab: Optional[int] = None  # keep at most this many tokens (text data sets)
    model: str = "rnn"  # rnn | seed | lmmodel1..4
    rnn: str = "fused"  # recurrent layer of --model rnn: 'fused' (rnnlm_ext.RNN) or 'torch' (nn.RNN)
    layers: int = 2
    hidden: int = 256
    nonlinearity: str = "relu"
    dropout: float = 0.0
    tie_weights: bool = False
    bptt: int = 16
    bs: int = 64  # rows per process
    epochs: int = 15
    lr: float = 3e-3  # peak of the one-cycle schedule
    wd: float = 0.01  # AdamW's decoupled weight decay
    clip: float = 1.0  # max gradient norm (0: no clipping)
    seed: int = 42
    save: Optional[str] = None  # checkpoint folder
    save_every: int = 0  # also checkpoint every this many steps (0: at the end of each epoch only)
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this many steps in all
    resume: Optional[str] = None  # continue the run checkpointed in this folder
    json: Optional[str] = None  # write the per-epoch metrics and final results here
    progress: Optional[bool] = None  # tqdm bar per epoch (None: only on a terminal)


# Settings that define a run; on --resume they come from the checkpoint, the rest from the caller.
RUN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)
              if f.name not in ("save", "save_every", "stop_after", "resume", "json", "progress")]
CHECKPOINT_KEYS = ["config", "vocab", "model"]  # what generate needs; resuming needs RESUME_KEYS too
RESUME_KEYS = ["optimizer", "scheduler", "epoch", "batch", "hidden", "per_rank", "history", "world_size"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, ranks out of sync); the message says why and what was kept."""


def _check(cfg: TrainConfig) -> None:
    for name in ("bptt", "bs", "epochs", "layers", "hidden", "min_freq"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_vocab", "stop_after"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.save_every < 0:
        raise ValueError(f"--save-every must be >= 0 (0: at the end of each epoch only), got {cfg.save_every}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {cfg.lr}")
    for name, what in (("wd", "(0: no weight decay)"), ("clip", "(0: no clipping)")):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} must be a finite number >= 0 {what}, got {value}")
    if cfg.nonlinearity not in ("relu", "tanh"):
        raise ValueError(f"--nonlinearity must be relu or tanh, got {cfg.nonlinearity!r}")
    if cfg.rnn not in RNN_CLASSES:
        raise ValueError(f"--rnn must be fused or torch, got {cfg.rnn!r}")
    if cfg.model == "lmmodel1" and cfg.bptt != 3:
        raise ValueError(f"--bptt must be 3 for lmmodel1 (it reads exactly three tokens), got {cfg.bptt}")
    if cfg.tie_weights and cfg.model != "rnn" and cfg.model != "seed":
        raise ValueError("--tie-weights needs --model rnn or seed")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def loss_and_correct(out: Tensor, y: Tensor, predicts_all: bool):
    """Mean cross-entropy, number of correct argmax predictions and of predictions.

    out [B,T,V] with y [B,T], or out [B,V] scored against the last target y[:, -1].
    """
    if not predicts_all:
        y = y[:, -1]  # [B]
    logits = out.reshape(-1, out.shape[-1])  # [B·T,V] or [B,V]
    y = y.reshape(-1)
    loss = F.cross_entropy(logits, y)
    return loss, (logits.argmax(-1) == y).sum().item(), y.numel()


@torch.no_grad()
def evaluate(model: nn.Module, rows: Tensor, bptt: int, drop_last: bool = False):
    """Mean loss and accuracy over rows [B,L], read in order from a zero hidden state (reset after)."""
    core = _core(model)
    was_training = core.training
    core.eval()
    models.reset_state(core)
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in data.batches(rows, bptt, drop_last=drop_last):
        loss, c, k = loss_and_correct(core(x), y, getattr(core, "predicts_all", False))
        loss_sum, correct, n = loss_sum + loss.item() * k, correct + c, n + k
    models.reset_state(core)
    core.train(was_training)
    totals = _all_reduce_sum([loss_sum, correct, n])
    return totals[0] / totals[2], totals[1] / totals[2]


def _core(model: nn.Module) -> nn.Module:
    """The model itself, under a DistributedDataParallel wrapper or not."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(values: List[float]) -> List[float]:
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _gather_rows(h: Optional[Tensor]) -> Optional[Tensor]:
    """Every process's hidden state joined along its batch dimension ([B,H] or [L,B,H]) -> all rows."""
    if h is None or not _distributed():
        return h
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, h.contiguous())
    return torch.cat(parts, dim=h.dim() - 2)


def _gather_objects(obj) -> list:
    if not _distributed():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def _check_in_sync(model: nn.Module) -> None:
    """DDP keeps every process's weights equal; stop loudly if they ever differ."""
    if not _distributed():
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
    lo, hi = checksum.clone(), checksum.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainingError("the processes' weights differ: distributed training is out of sync")


def _atomic_write(path: str, write: Callable) -> None:
    """write(file) to a temporary file beside `path`, then rename it over `path`: a crash or
    an error mid-write leaves the previous file intact and no temporary behind."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def _atomic_save(obj, folder: str) -> None:
    """DIR/checkpoint.pt, atomically: a crash mid-save leaves the previous checkpoint intact."""
    os.makedirs(folder, exist_ok=True)
    _atomic_write(os.path.join(folder, CHECKPOINT), lambda f: torch.save(obj, f))


def load_checkpoint(folder: str) -> dict:
    """Read DIR/checkpoint.pt, with an error naming the flag and the folder when it is missing or unreadable."""
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint/--resume: no {CHECKPOINT} in {folder!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"--checkpoint/--resume: {path!r} is not a readable checkpoint ({err})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    if missing:
        raise ValueError(f"--checkpoint/--resume: {path!r} is not a checkpoint of `rnnlm train --save` "
                         f"(it lacks {', '.join(missing)})")
    config = ckpt["config"]
    if not isinstance(config, dict) or set(config) != set(RUN_FIELDS):
        raise ValueError(f"--checkpoint/--resume: the settings stored in {path!r} are not those of this "
                         f"version of rnnlm train (expected {', '.join(RUN_FIELDS)})")
    ckpt["path"] = path
    return ckpt


def model_from_checkpoint(ckpt: dict):
    """(model, vocab, config) rebuilt from a checkpoint, weights loaded, in eval mode."""
    cfg = TrainConfig(**ckpt["config"])
    vocab = data.Vocab.from_state_dict(ckpt["vocab"])
    model = models.build_model(cfg.model, len(vocab), cfg.hidden, cfg.layers, cfg.nonlinearity,
                               cfg.dropout, cfg.tie_weights, RNN_CLASSES[cfg.rnn])
    _load_weights(model, ckpt)
    return model.eval(), vocab, cfg


def _load_weights(model: nn.Module, ckpt: dict) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"--checkpoint/--resume: the weights in {ckpt['path']!r} do not fit the model its "
                         f"settings describe ({str(err).splitlines()[-1].strip()})") from None


def _fingerprint(corpus: data.Corpus) -> dict:
    """What identifies the token streams a run reads: a resumed run must read the same."""
    digest = hashlib.sha256()
    for ids in (corpus.train, corpus.valid):
        digest.update(ids.numpy().tobytes())
    return {"train_tokens": len(corpus.train), "valid_tokens": len(corpus.valid), "sha256": digest.hexdigest()}


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks for a stop at the next batch boundary, where a checkpoint is consistent."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, log: Callable[[str], None] = print, given: Sequence[str] = ()) -> dict:
    """Train as cfg says; returns {'config', 'epochs': [...], 'final': {...}} (also written to cfg.json).

    given: the fields of cfg its caller set on purpose (the command line's flags). On resume a
    run-defining one that differs from the checkpoint's is an error, not silently ignored.
    Under torchrun (WORLD_SIZE > 1) it joins a gloo process group and wraps the model in DDP;
    only rank 0 logs and writes files.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _distributed():
        dist.init_process_group("gloo")
    try:
        return _train(cfg, log, given)
    finally:
        if _distributed():
            # The DDP wrapper sits in reference cycles, so only the garbage collector frees it,
            # and with it the group's last use. Left to interpreter teardown, Gloo's threads
            # could still hold work there and the process aborted at exit ("terminate called
            # without an active exception"), about one torchrun in ten. Free it first.
            gc.collect()
            dist.destroy_process_group()


def _train(cfg: TrainConfig, log: Callable[[str], None], given: Sequence[str]) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    log = log if rank == 0 else (lambda _: None)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"--resume: {ckpt['path']!r} cannot be resumed (it lacks {', '.join(missing)})")
        changed = [k for k in RUN_FIELDS if k in given and getattr(cfg, k) != ckpt["config"][k]]
        if changed:
            raise ValueError(
                "--resume continues the run with the settings it was checkpointed with; "
                + ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)} (the run's: {ckpt['config'][k]})" for k in changed)
                + ". Start a new run (without --resume) to change them.")
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in RUN_FIELDS})
        if ckpt["world_size"] != world:
            raise ValueError(f"--resume: the run was checkpointed with {ckpt['world_size']} processes, now {world}")
        cfg.save = cfg.save or cfg.resume
    _check(cfg)
    seed_everything(cfg.seed)
    vocab = data.Vocab.from_state_dict(ckpt["vocab"]) if ckpt else None
    corpus = data.load_corpus(cfg.dataset, cfg.level, cfg.min_freq, cfg.max_vocab, vocab)
    fingerprint = _fingerprint(corpus)
    if ckpt and ckpt.get("data", fingerprint) != fingerprint:  # older checkpoints have no fingerprint
        then, now = ckpt["data"], fingerprint
        raise ValueError(
            f"--resume: the data set {cfg.dataset!r} changed since the checkpoint ({then['train_tokens']:,} train / "
            f"{then['valid_tokens']:,} valid tokens then, {now['train_tokens']:,} / {now['valid_tokens']:,} now"
            f"{', same counts but other tokens' if then['train_tokens'] == now['train_tokens'] and then['valid_tokens'] == now['valid_tokens'] else ''}); "
            "resuming would not continue the same run")
    # Every process cuts the stream into world·bs rows and keeps its own bs of them.
    train_rows = data.batchify(corpus.train, cfg.bs * world, "train")[rank * cfg.bs : (rank + 1) * cfg.bs]
    valid_rows = data.batchify(corpus.valid, cfg.bs * world, "valid")[rank * cfg.bs : (rank + 1) * cfg.bs]
    drop_last = cfg.model == "lmmodel1"  # it reads exactly bptt tokens; the others take the shorter last batch
    n_batches = data.num_batches(train_rows, cfg.bptt, drop_last)
    for name, rows in (("train", train_rows), ("valid", valid_rows)):
        if data.num_batches(rows, cfg.bptt, drop_last) == 0:
            raise ValueError(f"--bptt {cfg.bptt} is longer than a {name} row ({rows.shape[1]} tokens at --bs {cfg.bs})")
    if rank == 0:  # a path that cannot take the output fails now, not after training
        if cfg.save:
            check_writable(cfg.save, "--save")
        if cfg.json:
            if os.path.isdir(cfg.json):
                raise ValueError(f"--json: {cfg.json!r} is a folder; give a file path")
            check_writable(os.path.dirname(os.path.abspath(cfg.json)), "--json")

    model = models.build_model(cfg.model, len(corpus.vocab), cfg.hidden, cfg.layers, cfg.nonlinearity,
                               cfg.dropout, cfg.tie_weights, RNN_CLASSES[cfg.rnn])
    core = model
    predicts_all = getattr(core, "predicts_all", False)
    # fused: one kernel for all parameters instead of a Python loop over them; measured per
    # step at h64 (the fastbook size) 0.35 -> 0.15 ms, at h256 x2 (the main job) 0.90 -> 0.34 ms.
    # A torch without the fused kernel for these tensors refuses it: then the plain loop.
    params = list(model.parameters())
    adamw = dict(lr=cfg.lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=cfg.wd)
    try:
        opt = torch.optim.AdamW(params, fused=True, **adamw)
    except RuntimeError:
        opt = torch.optim.AdamW(params, **adamw)
    # fastai's fit_one_cycle: 25% warm-up from lr/25, cosine down to lr/1e5, momentum 0.95 -> 0.85 -> 0.95
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * n_batches, pct_start=0.25, div_factor=25.0,
        final_div_factor=1e5 / 25, base_momentum=0.85, max_momentum=0.95,
    )
    history: List[dict] = []
    epoch, start_batch, running = 0, 0, {"loss": 0.0, "tokens": 0, "time": 0.0, "losses": []}
    if ckpt:
        _load_weights(model, ckpt)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history, epoch, start_batch = ckpt["history"], ckpt["epoch"], ckpt["batch"]
        if ckpt["hidden"] is not None:
            h = ckpt["hidden"]
            core.h = h.narrow(h.dim() - 2, rank * cfg.bs, cfg.bs).clone()
        mine = ckpt["per_rank"][rank]
        torch.set_rng_state(mine["torch"])
        random.setstate(mine["python"])
        running = mine["running"]
        log(f"resumed from {cfg.resume}: epoch {epoch + 1}, batch {start_batch} of {n_batches}")
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    step = epoch * n_batches + start_batch

    def checkpoint(epoch: int, batch: int, running: dict) -> None:
        hidden = _gather_rows(getattr(core, "h", None) if batch else None)
        per_rank = _gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(), "running": running})
        if rank != 0 or not cfg.save:
            return
        if not all(torch.isfinite(p).all() for p in core.parameters()):
            raise TrainingError(f"non-finite weights at step {step}; the last good checkpoint in {cfg.save} is kept")
        _atomic_save({
            "config": {k: getattr(cfg, k) for k in RUN_FIELDS}, "vocab": corpus.vocab.state_dict(),
            "model": core.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "batch": batch, "hidden": hidden, "per_rank": per_rank, "history": history,
            "world_size": world, "data": fingerprint,
        }, cfg.save)

    if not ckpt:
        log(f"{cfg.model} ({cfg.rnn if cfg.model == 'rnn' else 'seed cell' if cfg.model == 'seed' else 'reference'}): "
            f"{sum(p.numel() for p in core.parameters()):,} parameters, vocab {len(corpus.vocab)}, "
            f"{len(corpus.train):,} train / {len(corpus.valid):,} valid tokens, {n_batches} batches of "
            f"{world} x {cfg.bs} x {cfg.bptt} per epoch")
    log(f"{'epoch':>5} {'train_loss':>10} {'valid_loss':>10} {'accuracy':>8} {'perplexity':>10} {'tokens/s':>9} {'time':>6}")
    for past in history:
        log(_row(past))

    stopped = None
    with _StopRequest() as stop:
        while epoch < cfg.epochs and stopped is None:
            model.train()
            if start_batch == 0:
                models.reset_state(core)
            bar = tqdm(total=n_batches, initial=start_batch, desc=f"epoch {epoch + 1}", leave=False,
                       disable=True if rank != 0 else None if cfg.progress is None else not cfg.progress)
            t0 = time.perf_counter()
            for k, (x, y) in enumerate(data.batches(train_rows, cfg.bptt, start_batch, drop_last), start_batch):
                loss, _, _ = loss_and_correct(model(x), y, predicts_all)
                value = loss.item()
                # every process must see the same verdict, or the others would wait forever in backward
                if not math.isfinite(_all_reduce_sum([value])[0]):
                    where = ("no checkpoint was asked for (--save)" if not cfg.save else
                             f"the checkpoint in {cfg.save} is left as it was"
                             if os.path.isfile(os.path.join(cfg.save, CHECKPOINT))
                             else f"no checkpoint was written to {cfg.save} yet")
                    raise TrainingError(
                        f"loss is {value} at epoch {epoch + 1}, batch {k + 1}: training stopped "
                        f"({where}). Try a new run with a lower --lr or a smaller --clip (--resume keeps the run's settings).")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                sched.step()
                step += 1
                running["loss"] += value * x.numel()
                running["losses"].append(value)
                running["tokens"] += x.numel() * world
                bar.update(1)
                bar.set_postfix(loss=f"{running['loss'] * world / running['tokens']:.3f}")
                last = k + 1 == n_batches
                stop_now = stop.requested or (cfg.stop_after is not None and step >= cfg.stop_after)
                if not last and (stop_now or (cfg.save_every and step % cfg.save_every == 0)):
                    running["time"] += time.perf_counter() - t0
                    checkpoint(epoch, k + 1, running)
                    t0 = time.perf_counter()  # the save is not training time (nor is the end-of-epoch one)
                if stop_now and not last:
                    stopped = step
                    break
            bar.close()
            if stopped is not None:
                break
            running["time"] += time.perf_counter() - t0
            t_valid = time.perf_counter()
            valid_loss, valid_acc = evaluate(model, valid_rows, cfg.bptt, drop_last)
            _check_in_sync(core)
            train_loss = _all_reduce_sum([running["loss"]])[0] / running["tokens"]
            history.append({
                "epoch": epoch + 1, "train_loss": train_loss, "valid_loss": valid_loss,
                "valid_accuracy": valid_acc, "perplexity": _perplexity(valid_loss),
                "tokens_per_s": running["tokens"] / running["time"], "train_tokens": running["tokens"],
                "train_time": running["time"], "time": running["time"] + time.perf_counter() - t_valid,
                "step_losses": running["losses"],  # this process's loss at every step, for plots
            })
            log(_row(history[-1]))
            epoch, start_batch, running = epoch + 1, 0, {"loss": 0.0, "tokens": 0, "time": 0.0, "losses": []}
            checkpoint(epoch, 0, running)
            if stop.requested or (cfg.stop_after is not None and step >= cfg.stop_after and epoch < cfg.epochs):
                stopped = step

    result = {"config": dataclasses.asdict(cfg), "world_size": world, "epochs": history}
    if history:
        last = history[-1]
        result["final"] = {
            "valid_loss": last["valid_loss"], "valid_accuracy": last["valid_accuracy"],
            "perplexity": last["perplexity"],
            "tokens_per_s": sum(e["train_tokens"] for e in history) / sum(e["train_time"] for e in history),
        }
    if stopped is not None:
        result["stopped_at_step"] = stopped
        if stop.signum is not None:
            result["signal"] = stop.signum  # the command exits 128 + signum, as the shell's convention
        log(f"stopped after step {stopped}" + (f"; continue with --resume {cfg.save}" if cfg.save else ""))
    if cfg.json and rank == 0:
        _atomic_write(cfg.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 709 else math.inf  # exp overflows a float from 709.8


def _row(e: dict) -> str:
    return (f"{e['epoch']:>5} {e['train_loss']:>10.4f} {e['valid_loss']:>10.4f} {e['valid_accuracy']:>8.4f} "
            f"{e['perplexity']:>10.3f} {e['tokens_per_s']:>9.0f} {e['time']:>5.1f}s")
