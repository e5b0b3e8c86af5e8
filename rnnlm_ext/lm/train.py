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
import io
import json
import math
import os
import pickle
import random
import re
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm_ext._files import atomic_write, check_writable
from rnnlm_ext.lm import data, models
from rnnlm_ext.lm.errors import CheckpointWarning, SettingError, TrainingError
from rnnlm_ext.reference import NONLINEARITIES

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "rnnlm_ext checkpoint 2"  # the payload and its SHA-256

# What a setting left unset (None) is, by model: the main job's values for rnn and shared, the
# book's for its models (hidden 64, bs 64, fit_one_cycle, no clipping as fastai's Learner; the
# epochs, lr, wd, dropout, AR and TAR of each model's run in chapter 12).
_MAIN_JOB = dict(
    cell="rnn",
    hidden_size=256,
    layers=2,
    nonlinearity="relu",
    dropout=0.0,
    tie_weights=False,
    bptt=16,
    epochs=15,
    lr=3e-3,
    wd=0.01,
    moms="0.95,0.85",
    clip=1.0,
    ar=0.0,
    tar=0.0,
)
_BOOK = {**_MAIN_JOB, "hidden_size": 64, "clip": 0.0}
MODEL_DEFAULTS = {
    "rnn": _MAIN_JOB,
    "shared": _MAIN_JOB,
    "lmmodel1": {**_BOOK, "layers": 1, "bptt": 3, "epochs": 4, "lr": 1e-3},
    "lmmodel2": {**_BOOK, "layers": 1, "bptt": 3, "epochs": 4, "lr": 1e-3},
    "lmmodel3": {**_BOOK, "layers": 1, "bptt": 3, "epochs": 10},
    "lmmodel4": {**_BOOK, "layers": 1},
    "lmmodel5": {**_BOOK, "nonlinearity": "tanh"},  # nn.RNN's default
    "lmmodel6": {**_BOOK, "cell": "lstm", "nonlinearity": "tanh", "lr": 1e-2},
    # the book's trained row: TextLearner(LMModel7(..., 0.4)), whose defaults are AR 2, TAR 1 and
    # momentum 0.8 -> 0.7 -> 0.8; fit_one_cycle(15, 1e-2, wd=0.1)
    "lmmodel7": {
        **_BOOK,
        "cell": "lstm",
        "nonlinearity": "tanh",
        "lr": 1e-2,
        "wd": 0.1,
        "dropout": 0.4,
        "tie_weights": True,
        "ar": 2.0,
        "tar": 1.0,
        "moms": "0.8,0.7",
    },
}
AWD_DROPS = ("embed_drop", "input_drop", "hidden_drop", "output_drop", "weight_drop")  # RNNLM's only


def _models_help(names: list[str]) -> str:
    """'rnn, shared, lmmodel1-4' for a list of model names in MODELS' order."""
    parts, run = [], []
    for name in [*names, None]:
        if name is not None and name.startswith("lmmodel") and (not run or int(name[7:]) == int(run[-1][7:]) + 1):
            run.append(name)
            continue
        if run:
            parts.append(run[0] if len(run) == 1 else f"{run[0]}-{run[-1][7:]}")
            run = [name] if name is not None and name.startswith("lmmodel") else []
        if name is not None and not name.startswith("lmmodel"):
            parts.append(name)
    return ", ".join(parts)


def model_default_help(name: str) -> str:
    """What an unset setting becomes, per model, for the help: '64 for lmmodel1-7; 256 for rnn, shared'."""
    by_value = {}
    for model, defaults in MODEL_DEFAULTS.items():
        by_value.setdefault(defaults[name], []).append(model)
    if len(by_value) == 1:
        return f"{next(iter(by_value))}"
    text = "; ".join(f"{value} for {_models_help(names)}" for value, names in by_value.items())
    return text + ("; tanh for the lstm and gru cells" if name == "nonlinearity" else "")


def _setting(default, help: str, **cli):
    """A TrainConfig field: its default, the help text and, for the command line, any of flag
    (when not --name), choices and metavar."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    dataset: str = _setting(
        "human-numbers",
        "'human-numbers', 'tiny-shakespeare' (downloaded once into "
        "$RNNLM_EXT_DATA, else ~/.cache/rnnlm_ext), or a text file or folder of .txt files",
    )
    level: str = _setting("word", "tokens: words or characters", choices=["word", "char"])
    min_freq: int = _setting(1, "rarer tokens become <unk> (text data sets; human-numbers keeps its whole vocabulary)")
    max_vocab: int | None = _setting(
        None, "keep this many most frequent tokens, plus <unk> (text data sets, as --min-freq)"
    )
    model: str = _setting(
        "rnn",
        "rnn: RNNLM on --rnn's --cell; shared: LMModel4's shared-weight cell on the fused layer; lmmodel1-7: "
        "fastbook's (lmmodel5-7 on --rnn's layers)",
        choices=list(models.MODELS),
    )
    rnn: str = _setting(
        "fused",
        "recurrent layers of --model rnn and lmmodel5-7: fused (rnnlm_ext.RNN, LSTM, GRU) or torch (torch.nn's)",
        choices=list(models.LAYER_CLASSES),
    )
    cell: str | None = _setting(
        None, "the recurrent cell of --model rnn (lmmodel5-7 fix theirs)", choices=list(models.CELLS)
    )
    layers: int | None = _setting(None, "recurrent layers")
    hidden_size: int | None = _setting(None, "hidden units per layer (also the embedding size)", flag="--hidden")
    nonlinearity: str | None = _setting(None, "the Elman cell's activation", choices=list(NONLINEARITIES))
    dropout: float | None = _setting(
        None,
        "plain dropout in [0, 1): rnn and shared on the embeddings, between layers and before the output "
        "layer; lmmodel5-7 before the output layer",
    )
    embed_drop: float = _setting(0.0, "rnn, shared: drop whole embedding rows (words) with this probability")
    input_drop: float = _setting(0.0, "rnn, shared: variational dropout (one mask per sequence) on the embeddings")
    hidden_drop: float = _setting(0.0, "rnn, shared: variational dropout between recurrent layers")
    output_drop: float = _setting(0.0, "rnn, shared: variational dropout on the last layer's output")
    weight_drop: float = _setting(0.0, "rnn: DropConnect on every layer's W_hh (a fresh mask each batch)")
    ar: float | None = _setting(None, "activation regularisation: ar·mean(out²) of the last layer's dropped output")
    tar: float | None = _setting(
        None, "temporal activation regularisation: tar·mean((h_t − h_{t−1})²) of the last layer's undropped output"
    )
    tie_weights: bool | None = _setting(None, "share the embedding with the output layer")
    bptt: int | None = _setting(None, "tokens per batch row (truncated BPTT length)")
    bs: int = _setting(64, "batch rows per process")
    epochs: int | None = _setting(None, "passes over the train stream")
    lr: float | None = _setting(None, "peak learning rate of the one-cycle schedule")
    wd: float | None = _setting(None, "AdamW's decoupled weight decay")
    moms: str | None = _setting(
        None, "the one-cycle momentum (Adam's beta1): HI,LO goes HI -> LO -> HI", metavar="HI,LO"
    )
    clip: float | None = _setting(None, "max gradient norm (0: off)")
    seed: int = _setting(42, "seed of the weights, dropout and sampling")
    save: str | None = _setting(None, "write DIR/checkpoint.pt (atomically) after every epoch", metavar="DIR")
    save_every: int = _setting(
        0, "also checkpoint every STEPS steps (0: at the end of each epoch only)", metavar="STEPS"
    )
    stop_after: int | None = _setting(None, "stop after STEPS steps in all (checkpointed with --save)", metavar="STEPS")
    resume: str | None = _setting(
        None,
        "continue the run checkpointed in DIR exactly, with its settings (a flag that would change one is an error)",
        metavar="DIR",
    )
    json: str | None = _setting(None, "write per-epoch metrics and final results as JSON", metavar="PATH")
    progress: bool | None = _setting(None, "a progress bar per epoch (needs tqdm; unset: on a terminal only)")


# Settings that define a run; on resume they come from the checkpoint, the rest from the caller.
RUN_FIELDS = [
    f.name
    for f in dataclasses.fields(TrainConfig)
    if f.name not in ("save", "save_every", "stop_after", "resume", "json", "progress")
]
CHECKPOINT_KEYS = ["config", "vocab", "model"]  # what generate needs; resuming needs RESUME_KEYS too
RESUME_KEYS = ["optimizer", "scheduler", "epoch", "batch", "hidden_state", "per_rank", "history", "world_size"]


def resolve(cfg: TrainConfig) -> TrainConfig:
    """cfg with every unset (None) setting of MODEL_DEFAULTS taken from its model's defaults."""
    if cfg.model not in MODEL_DEFAULTS:
        raise SettingError(f"model must be one of {', '.join(models.MODELS)}, got {cfg.model!r}", "model")
    defaults = dict(MODEL_DEFAULTS[cfg.model])
    if (cfg.cell or defaults["cell"]) in ("lstm", "gru"):
        defaults["nonlinearity"] = "tanh"  # their candidate activation; there is no other to choose
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def moms_of(cfg: TrainConfig) -> tuple[float, float]:
    """cfg.moms 'HI,LO' as two numbers in [0, 1)."""
    try:
        hi, lo = (float(v) for v in cfg.moms.split(","))
    except ValueError:
        hi = lo = math.nan
    if not (0 <= hi < 1 and 0 <= lo < 1):
        raise SettingError(f"moms must be two numbers in [0, 1) as HI,LO (e.g. 0.95,0.85), got {cfg.moms!r}", "moms")
    return hi, lo


def _check(cfg: TrainConfig) -> None:
    for name in ("bptt", "bs", "epochs", "layers", "hidden_size", "min_freq"):
        if getattr(cfg, name) < 1:
            raise SettingError(f"{name} must be >= 1, got {getattr(cfg, name)}", name)
    for name in ("max_vocab", "stop_after"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise SettingError(f"{name} must be >= 1, got {getattr(cfg, name)}", name)
    if cfg.save_every < 0:
        raise SettingError(
            f"save_every must be >= 0 (0: at the end of each epoch only), got {cfg.save_every}", "save_every"
        )
    for name in ("dropout", *AWD_DROPS):
        if not 0 <= getattr(cfg, name) < 1:
            raise SettingError(f"{name} must be in [0, 1), got {getattr(cfg, name)}", name)
        if name != "dropout" and getattr(cfg, name) and cfg.model not in ("rnn", "shared"):
            raise SettingError(
                f"{name} needs model rnn or shared (RNNLM); {cfg.model} is the book's as it stands", name, "model"
            )
    if cfg.weight_drop and cfg.model == "shared":
        raise SettingError("weight_drop needs a cell with its own W_hh; the shared cell's is its W_ih", "weight_drop")
    for name in ("ar", "tar"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise SettingError(f"{name} must be a finite number >= 0 (0: off), got {value}", name)
        if value and cfg.model in models.FASTBOOK_MODELS:
            raise SettingError(
                f"{name} needs model rnn, shared or lmmodel5-7 (a recurrent layer's outputs)", name, "model"
            )
    moms_of(cfg)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise SettingError(f"lr must be a finite number > 0, got {cfg.lr}", "lr")
    for name, what in (("wd", "(0: no weight decay)"), ("clip", "(0: no clipping)")):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise SettingError(f"{name} must be a finite number >= 0 {what}, got {value}", name)
    if cfg.nonlinearity not in NONLINEARITIES:
        raise SettingError(f"nonlinearity must be relu or tanh, got {cfg.nonlinearity!r}", "nonlinearity")
    if cfg.rnn not in models.LAYER_CLASSES:
        raise SettingError(f"rnn must be fused or torch, got {cfg.rnn!r}", "rnn")
    if cfg.cell not in models.CELLS:
        raise SettingError(f"cell must be one of {', '.join(models.CELLS)}, got {cfg.cell!r}", "cell")
    if cfg.model != "rnn" and cfg.cell != MODEL_DEFAULTS[cfg.model]["cell"]:
        raise SettingError(
            f"cell is {MODEL_DEFAULTS[cfg.model]['cell']} for model {cfg.model}, got {cfg.cell}; "
            "model rnn takes any cell",
            "cell",
            "model",
        )
    if cfg.cell != "rnn" and cfg.nonlinearity != "tanh":
        raise SettingError(
            f"nonlinearity is the Elman cell's; the {cfg.cell} cell's is tanh, got {cfg.nonlinearity}", "nonlinearity"
        )
    if cfg.model == "lmmodel1" and cfg.bptt != 3:
        raise SettingError(f"bptt must be 3 for lmmodel1 (it reads exactly three tokens), got {cfg.bptt}", "bptt")
    if cfg.tie_weights and cfg.model in models.FASTBOOK_MODELS:
        raise SettingError("tie_weights needs model rnn, shared or lmmodel5-7", "tie_weights", "model")


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


def _all_reduce_sum(values: list[float]) -> list[float]:
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _gather_rows(h):
    """Every process's hidden state joined along its batch dimension ([B,H], [L,B,H] or the LSTM's
    pair of them) -> all rows."""
    if h is None or not _distributed():
        return h
    if isinstance(h, tuple):
        return tuple(_gather_rows(part) for part in h)
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


def _atomic_save(obj, folder: str) -> None:
    """DIR/checkpoint.pt, atomically: a crash mid-save leaves the previous checkpoint intact.

    The file holds the serialised payload with its SHA-256 ({'format', 'sha256', 'payload'}),
    so that a damaged file is refused on loading instead of loading half right.
    """
    os.makedirs(folder, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    sealed = {
        "format": CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }  # uint8: no byte order to damage
    atomic_write(os.path.join(folder, CHECKPOINT), lambda f: torch.save(sealed, f))


def _safe_load(source, path: str, name: str):
    """torch.load that only rebuilds tensors, numbers, strings and containers: unpickling
    anything else could call any function the file names, so such a file is refused."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"WeightsUnpickler error: (.+?)(?: Please use|\n|$)", str(err))
        if refused is None:
            raise SettingError(f"{name}: {path!r} is not a readable checkpoint ({err})", name) from None
        raise SettingError(
            f"{name}: {path!r} holds more than tensors, numbers, strings and containers ({refused.group(1)}); "
            "loading that could run code from the file, so it is refused (`rnnlm train --save` writes nothing "
            "else: use files from a source you trust).",
            name,
        ) from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise SettingError(f"{name}: {path!r} is not a readable checkpoint ({err})", name) from None


def _unseal(sealed, path: str, name: str):
    """The payload of a checkpoint written by _atomic_save, once its SHA-256 matches; an older
    checkpoint (the payload itself, without a checksum) is returned as it is, with a warning."""
    if not (isinstance(sealed, dict) and "format" in sealed):
        warnings.warn(
            CheckpointWarning(
                f"{name}: {path!r} has no checksum (an older rnnlm_ext wrote it), so it cannot be checked for damage; "
                "it is used as it is (its tensors must still be finite), and the next save adds a checksum.",
                name,
            ),
            stacklevel=3,
        )
        return sealed
    payload, digest = sealed.get("payload"), sealed.get("sha256")
    if sealed["format"] != CHECKPOINT_FORMAT or not isinstance(payload, Tensor) or payload.dtype != torch.uint8:
        raise SettingError(
            f"{name}: {path!r} is not a checkpoint of this version of rnnlm train "
            f"(format {sealed['format']!r}, expected {CHECKPOINT_FORMAT!r})",
            name,
        )
    raw = payload.numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise SettingError(
            f"{name}: {path!r} is damaged: its contents do not match the SHA-256 saved with them "
            "(a disk or copy error, or an edit), so none of it is used",
            name,
        )
    return _safe_load(io.BytesIO(raw), path, name)


def _non_finite(obj, where: str = "") -> str | None:
    """Where obj (nested dicts, lists and tuples) holds a floating tensor with a NaN or an inf, e.g.
    "optimizer['state'][0]['exp_avg_sq'] (nan)"; None when it holds none."""
    if isinstance(obj, Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not torch.isfinite(obj).all():
            return f"{where} ({'nan' if torch.isnan(obj).any() else 'inf'})"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}[{key!r}]" if where else str(key))
        if found:
            return found
    return None


def load_checkpoint(folder: str, name: str = "folder") -> dict:
    """Read folder/checkpoint.pt; an error names the setting `name` and the folder when it is missing or unreadable."""
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no {CHECKPOINT} in {folder!r}")
    ckpt = _unseal(_safe_load(path, path, name), path, name)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    if missing:
        raise SettingError(
            f"{name}: {path!r} is not a checkpoint of `rnnlm train --save` (it lacks {', '.join(missing)})", name
        )
    config = ckpt["config"]
    if not isinstance(config, dict) or set(config) != set(RUN_FIELDS):
        raise SettingError(
            f"{name}: the settings stored in {path!r} are not those of this "
            f"version of rnnlm train (expected {', '.join(RUN_FIELDS)})",
            name,
        )
    bad = _non_finite(ckpt)
    if bad:
        raise SettingError(
            f"{name}: {path!r} holds non-finite values in {bad}: resuming or sampling from them "
            "would carry them into every step, so it is not used",
            name,
        )
    ckpt["path"] = path
    return ckpt


def model_from_checkpoint(ckpt: dict):
    """(model, vocab, config) rebuilt from a checkpoint, weights loaded, in eval mode."""
    cfg = TrainConfig(**ckpt["config"])
    vocab = data.Vocab.from_state_dict(ckpt["vocab"])
    model = _build_model(cfg, len(vocab))
    _load_weights(model, ckpt)
    return model.eval(), vocab, cfg


def _build_model(cfg: TrainConfig, vocab_sz: int) -> nn.Module:
    awd = {name: getattr(cfg, name) for name in AWD_DROPS if getattr(cfg, name)}
    return models.build_model(
        cfg.model,
        vocab_sz,
        cfg.hidden_size,
        cfg.layers,
        cfg.nonlinearity,
        cfg.dropout,
        cfg.tie_weights,
        cfg.rnn,
        cfg.cell,
        **awd,
    )


def _load_weights(model: nn.Module, ckpt: dict) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(
            f"the weights in {ckpt['path']!r} do not fit the model its "
            f"settings describe ({str(err).splitlines()[-1].strip()})"
        ) from None


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
        self.signum: int | None = None
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


def make_optimizer(params, lr: float, wd: float, total_steps: int, moms: tuple[float, float] = (0.95, 0.85)):
    """AdamW and fastai's fit_one_cycle schedule: 25% warm-up from lr/25, cosine down to lr/1e5,
    momentum (Adam's beta1) moms[0] -> moms[1] -> moms[0]. Returns (optimizer, scheduler); step the
    scheduler after every optimizer step, total_steps times in all."""
    params = list(params)
    adamw = dict(lr=lr, betas=(moms[0], 0.99), eps=1e-5, weight_decay=wd)
    # fused: one kernel for all parameters instead of a Python loop over them. A torch without
    # the fused kernel for these tensors refuses it: then the plain loop.
    try:
        opt = torch.optim.AdamW(params, fused=True, **adamw)
    except RuntimeError:
        opt = torch.optim.AdamW(params, **adamw)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=lr,
        total_steps=total_steps,
        pct_start=0.25,
        div_factor=25.0,
        final_div_factor=1e5 / 25,
        base_momentum=moms[1],
        max_momentum=moms[0],
    )
    return opt, sched


@dataclass
class EpochSums:
    """One process's running sums over the epoch in progress (checkpointed, for an exact resume)."""

    loss: float = 0.0  # this process's loss · tokens, summed over its batches
    tokens: int = 0  # tokens read by all processes
    time: float = 0.0  # seconds of training, checkpoint writes left out
    losses: list[float] = field(default_factory=list)  # this process's loss at every step, for plots


@dataclass
class _Data:
    """The token streams of a run, cut into this process's rows."""

    corpus: data.Corpus
    fingerprint: dict  # what identifies the streams (_fingerprint)
    train_rows: Tensor  # [B,L_train]
    valid_rows: Tensor  # [B,L_valid]
    drop_last: bool  # the last, shorter batch is dropped (lmmodel1 reads exactly bptt tokens)
    n_batches: int  # train batches per epoch


@dataclass
class _Run:
    """What the epoch loop, the checkpoints and the summary share; epoch, start_batch, step and
    sums say where the run is."""

    cfg: TrainConfig
    rank: int
    world: int
    data: _Data
    model: nn.Module  # the model, or its DistributedDataParallel wrapper
    core: nn.Module  # the model itself
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    log: Callable[[str], None]
    history: list[dict] = field(default_factory=list)
    epoch: int = 0
    start_batch: int = 0
    step: int = 0
    sums: EpochSums = field(default_factory=EpochSums)

    def own_rows(self, h: Tensor) -> Tensor:
        """This process's bs rows of a state holding every process's ([..., B·world, H])."""
        return h.narrow(h.dim() - 2, self.rank * self.cfg.bs, self.cfg.bs).clone()


def train(cfg: TrainConfig, log: Callable[[str], None] = print, explicit: Sequence[str] = ()) -> dict:
    """Train as cfg says; returns {'config', 'epochs': [...], 'final': {...}} (also written to cfg.json).

    explicit: the fields of cfg its caller set on purpose (the command line's flags). On resume a
    run-defining one that differs from the checkpoint's is an error, not silently ignored.
    Under torchrun (WORLD_SIZE > 1) it joins a gloo process group and wraps the model in DDP;
    only rank 0 logs and writes files.
    """
    # Late in training, values below float32's normal range appear and every operation on them
    # takes a slow microcode path; flushed to zero, throughput stays flat with the same losses.
    torch.set_flush_denormal(True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _distributed():
        dist.init_process_group("gloo")
    try:
        return _train(cfg, log, explicit)
    finally:
        if _distributed():
            # The DDP wrapper sits in reference cycles, so only the garbage collector frees it,
            # and with it the group's last use. Left to interpreter teardown, Gloo's threads
            # could still hold work there and the process aborted at exit ("terminate called
            # without an active exception"). Free it first.
            gc.collect()
            dist.destroy_process_group()


def _train(cfg: TrainConfig, log: Callable[[str], None], explicit: Sequence[str]) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    ckpt = None
    if cfg.resume:
        cfg, ckpt = _resume_settings(cfg, explicit, world)
        if ckpt["epoch"] >= cfg.epochs:
            return _already_complete(cfg, ckpt, world, log if rank == 0 else (lambda _: None))
    cfg = resolve(cfg)
    _check(cfg)
    seed_everything(cfg.seed)
    run_data = _load_data(cfg, ckpt, rank, world)
    if rank == 0:
        _check_outputs(cfg)
    if cfg.epochs * run_data.n_batches < 5:  # OneCycleLR's warm-up (25%) must hold at least one step
        raise SettingError(
            f"the run has {cfg.epochs * run_data.n_batches} steps ({run_data.n_batches} batches per epoch × "
            f"{cfg.epochs}); the one-cycle schedule needs at least 5: more epochs, a smaller bptt or bs",
            "epochs",
            "bptt",
            "bs",
        )
    model = _build_model(cfg, len(run_data.corpus.vocab))
    opt, sched = make_optimizer(model.parameters(), cfg.lr, cfg.wd, cfg.epochs * run_data.n_batches, moms_of(cfg))
    run = _Run(cfg, rank, world, run_data, model, model, opt, sched, log if rank == 0 else (lambda _: None))
    if ckpt:
        _restore(run, ckpt)
    if world > 1:
        run.model = nn.parallel.DistributedDataParallel(model)
    run.step = run.epoch * run_data.n_batches + run.start_batch
    _log_header(run, resumed=ckpt is not None)
    stopped, signum = _fit(run)
    return _summary(run, stopped, signum)


def _resume_settings(cfg: TrainConfig, explicit: Sequence[str], world: int) -> tuple[TrainConfig, dict]:
    """The checkpoint in cfg.resume and cfg with the run's settings from it."""
    ckpt = load_checkpoint(cfg.resume, "resume")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise SettingError(f"resume: {ckpt['path']!r} cannot be resumed (it lacks {', '.join(missing)})", "resume")
    changed = [k for k in RUN_FIELDS if k in explicit and getattr(cfg, k) != ckpt["config"][k]]
    if changed:
        raise SettingError(
            "resume continues the run with the settings it was checkpointed with; "
            + ", ".join(f"{k} {getattr(cfg, k)} (the run's: {ckpt['config'][k]})" for k in changed)
            + ". Start a new run (without resume) to change them.",
            "resume",
            *changed,
        )
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in RUN_FIELDS})
    if ckpt["world_size"] != world:
        raise SettingError(
            f"resume: the run was checkpointed with {ckpt['world_size']} processes, now {world}", "resume"
        )
    cfg.save = cfg.save or cfg.resume
    return cfg, ckpt


def _load_data(cfg: TrainConfig, ckpt: dict | None, rank: int, world: int) -> _Data:
    """The corpus (with the checkpoint's vocabulary on resume) and this process's rows of it."""
    vocab = data.Vocab.from_state_dict(ckpt["vocab"]) if ckpt else None
    corpus = data.load_corpus(cfg.dataset, cfg.level, cfg.min_freq, cfg.max_vocab, vocab)
    fingerprint = _fingerprint(corpus)
    if ckpt and ckpt.get("data", fingerprint) != fingerprint:  # older checkpoints have no fingerprint
        then, now = ckpt["data"], fingerprint
        same_counts = then["train_tokens"] == now["train_tokens"] and then["valid_tokens"] == now["valid_tokens"]
        raise SettingError(
            f"resume: the data set {cfg.dataset!r} changed since the checkpoint ({then['train_tokens']:,} train / "
            f"{then['valid_tokens']:,} valid tokens then, {now['train_tokens']:,} / {now['valid_tokens']:,} now"
            f"{', same counts but other tokens' if same_counts else ''}); resuming would not continue the same run",
            "resume",
        )
    # Every process cuts the stream into world·bs rows and keeps its own bs of them.
    train_rows = data.batchify(corpus.train, cfg.bs * world, "train")[rank * cfg.bs : (rank + 1) * cfg.bs]
    valid_rows = data.batchify(corpus.valid, cfg.bs * world, "valid")[rank * cfg.bs : (rank + 1) * cfg.bs]
    drop_last = cfg.model == "lmmodel1"  # it reads exactly bptt tokens; the others take the shorter last batch
    for name, rows in (("train", train_rows), ("valid", valid_rows)):
        if data.num_batches(rows, cfg.bptt, drop_last) == 0:
            raise SettingError(
                f"bptt {cfg.bptt} is longer than a {name} row ({rows.shape[1]} tokens at bs {cfg.bs})", "bptt", "bs"
            )
    n_batches = data.num_batches(train_rows, cfg.bptt, drop_last)
    return _Data(corpus, fingerprint, train_rows, valid_rows, drop_last, n_batches)


def _check_outputs(cfg: TrainConfig) -> None:
    """A path that cannot take the output fails now, not after training."""
    if cfg.save:
        check_writable(cfg.save, "save")
    if cfg.json:
        if os.path.isdir(cfg.json):
            raise SettingError(f"json: {cfg.json!r} is a folder; give a file path", "json")
        check_writable(os.path.dirname(os.path.abspath(cfg.json)), "json")


def _restore(run: _Run, ckpt: dict) -> None:
    """Weights, optimizer, schedule, hidden state, random states and the epoch's sums from ckpt."""
    _load_weights(run.core, ckpt)
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    run.history, run.epoch, run.start_batch = ckpt["history"], ckpt["epoch"], ckpt["batch"]
    if ckpt["hidden_state"] is not None:
        h = ckpt["hidden_state"]  # every process's rows: [B·world,H], [L,B·world,H] or the LSTM's pair
        run.core.h = tuple(map(run.own_rows, h)) if isinstance(h, (tuple, list)) else run.own_rows(h)
    this_rank = ckpt["per_rank"][run.rank]
    torch.set_rng_state(this_rank["torch"])
    random.setstate(this_rank["python"])
    run.sums = EpochSums(**this_rank["sums"])
    run.log(f"resumed from {run.cfg.resume}: epoch {run.epoch + 1}, batch {run.start_batch} of {run.data.n_batches}")


def _checkpoint(run: _Run, epoch: int, batch: int) -> None:
    """Write the run's state at (epoch, batch) to cfg.save; every process takes part (gathers)."""
    hidden_state = _gather_rows(getattr(run.core, "h", None) if batch else None)
    per_rank = _gather_objects(
        {"torch": torch.get_rng_state(), "python": random.getstate(), "sums": dataclasses.asdict(run.sums)}
    )
    cfg = run.cfg
    if run.rank != 0 or not cfg.save:
        return
    if not all(torch.isfinite(p).all() for p in run.core.parameters()):
        raise TrainingError(f"non-finite weights at step {run.step}; the last good checkpoint in {cfg.save} is kept")
    _atomic_save(
        {
            "config": {k: getattr(cfg, k) for k in RUN_FIELDS},
            "vocab": run.data.corpus.vocab.state_dict(),
            "model": run.core.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "hidden_state": hidden_state,
            "per_rank": per_rank,
            "history": run.history,
            "world_size": run.world,
            "data": run.data.fingerprint,
        },
        cfg.save,
    )


def _log_header(run: _Run, resumed: bool) -> None:
    cfg, corpus = run.cfg, run.data.corpus
    if not resumed:
        layer = f"{cfg.rnn} {cfg.cell}" if cfg.model == "rnn" or cfg.model in models.STACK_MODELS else "reference"
        layer = "shared-weight cell" if cfg.model == "shared" else layer
        run.log(
            f"{cfg.model} ({layer}): {sum(p.numel() for p in run.core.parameters()):,} parameters, "
            f"vocab {len(corpus.vocab)}, {len(corpus.train):,} train / {len(corpus.valid):,} valid tokens, "
            f"{run.data.n_batches} batches of {run.world} x {cfg.bs} x {cfg.bptt} per epoch"
        )
    run.log(
        f"{'epoch':>5} {'train_loss':>10} {'valid_loss':>10} {'accuracy':>8} {'perplexity':>10} "
        f"{'tokens/s':>9} {'time':>6}"
    )
    for past in run.history:
        run.log(_row(past))


def _fit(run: _Run) -> tuple[int | None, int | None]:
    """The epochs from where the run is. Returns (the step it stopped after, the signal that
    stopped it); (None, None) when it ran to the end."""
    cfg = run.cfg
    with _StopRequest() as stop:
        while run.epoch < cfg.epochs:
            if _train_epoch(run, stop):
                return run.step, stop.signum
            _end_epoch(run)
            if stop.requested or (cfg.stop_after is not None and run.step >= cfg.stop_after and run.epoch < cfg.epochs):
                return run.step, stop.signum
    return None, None


def _progress_bar(run: _Run):
    """A tqdm bar over the epoch's batches, or a stand-in that shows nothing."""
    cfg = run.cfg
    if run.rank != 0 or cfg.progress is False:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        if cfg.progress:
            raise SettingError("progress needs tqdm: pip install 'rnnlm_ext[lm]' (or tqdm)", "progress") from None
        return _NoBar()  # unset: a bar where one can be shown
    return tqdm(
        total=run.data.n_batches,
        initial=run.start_batch,
        desc=f"epoch {run.epoch + 1}",
        leave=False,
        disable=None if cfg.progress is None else False,
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _train_epoch(run: _Run, stop: _StopRequest) -> bool:
    """Train on the epoch's batches from run.start_batch; True when it stopped before the end."""
    cfg, rows = run.cfg, run.data
    run.model.train()
    if run.start_batch == 0:
        models.reset_state(run.core)
    bar = _progress_bar(run)
    t0 = time.perf_counter()
    try:
        for k, (x, y) in enumerate(
            data.batches(rows.train_rows, cfg.bptt, run.start_batch, rows.drop_last), run.start_batch
        ):
            value = _train_step(run, x, y, k)
            run.step += 1
            run.sums.loss += value * x.numel()
            run.sums.losses.append(value)
            run.sums.tokens += x.numel() * run.world
            bar.update(1)
            bar.set_postfix(loss=f"{run.sums.loss * run.world / run.sums.tokens:.3f}")
            if k + 1 == rows.n_batches:
                break
            stop_now = stop.requested or (cfg.stop_after is not None and run.step >= cfg.stop_after)
            if stop_now or (cfg.save_every and run.step % cfg.save_every == 0):
                run.sums.time += time.perf_counter() - t0
                _checkpoint(run, run.epoch, k + 1)
                t0 = time.perf_counter()  # the save is not training time (nor is the end-of-epoch one)
            if stop_now:
                return True
    finally:
        bar.close()
    run.sums.time += time.perf_counter() - t0
    return False


def _train_step(run: _Run, x: Tensor, y: Tensor, k: int) -> float:
    """Forward, backward and an optimizer step on batch k (x, y [B,T]); returns the loss."""
    cfg = run.cfg
    loss, _, _ = loss_and_correct(run.model(x), y, getattr(run.core, "predicts_all", False))
    value = loss.item()  # the loss reported is the cross-entropy alone, as fastai's
    # every process must see the same verdict, or the others would wait forever in backward
    if not math.isfinite(_all_reduce_sum([value])[0]):
        where = (
            "no checkpoint was asked for (save)"
            if not cfg.save
            else f"the checkpoint in {cfg.save} is left as it was"
            if os.path.isfile(os.path.join(cfg.save, CHECKPOINT))
            else f"no checkpoint was written to {cfg.save} yet"
        )
        raise TrainingError(
            f"loss is {value} at epoch {run.epoch + 1}, batch {k + 1}: training stopped ({where}). Try a new "
            "run with a lower lr or a smaller clip (resume keeps the run's settings).",
            "save",
            "lr",
            "clip",
            "resume",
        )
    if cfg.ar or cfg.tar:
        loss = loss + models.activation_penalty(run.core.raw_out, run.core.out, cfg.ar, cfg.tar)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
    run.opt.step()
    run.sched.step()
    return value


def _end_epoch(run: _Run) -> None:
    """Validate, record and log the epoch, then checkpoint the start of the next one."""
    t_valid = time.perf_counter()
    valid_loss, valid_acc = evaluate(run.model, run.data.valid_rows, run.cfg.bptt, run.data.drop_last)
    _check_in_sync(run.core)
    sums = run.sums
    train_loss = _all_reduce_sum([sums.loss])[0] / sums.tokens
    run.history.append(
        {
            "epoch": run.epoch + 1,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "valid_accuracy": valid_acc,
            "perplexity": _perplexity(valid_loss),
            "tokens_per_s": sums.tokens / sums.time,
            "train_tokens": sums.tokens,
            "train_time": sums.time,
            "time": sums.time + time.perf_counter() - t_valid,
            "step_losses": sums.losses,
        }
    )
    run.log(_row(run.history[-1]))
    run.epoch, run.start_batch, run.sums = run.epoch + 1, 0, EpochSums()
    _checkpoint(run, run.epoch, 0)


def _summary(run: _Run, stopped: int | None, signum: int | None) -> dict:
    """The result train() returns (and writes to cfg.json): settings, epochs, final metrics, how it stopped."""
    cfg, history = run.cfg, run.history
    result = {"config": dataclasses.asdict(cfg), "world_size": run.world, "epochs": history}
    if history:
        result["final"] = _final(history)
    if stopped is not None:
        result["stopped_at_step"] = stopped
        if signum is not None:
            result["signal"] = signum  # the command exits 128 + signum, as the shell's convention
        run.log(f"stopped after step {stopped}" + (f"; continue with --resume {cfg.save}" if cfg.save else ""))
    if cfg.json and run.rank == 0:
        atomic_write(cfg.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


def _final(history: list[dict]) -> dict:
    """The last epoch's validation figures and the training throughput over all epochs."""
    last = history[-1]
    return {
        "valid_loss": last["valid_loss"],
        "valid_accuracy": last["valid_accuracy"],
        "perplexity": last["perplexity"],
        "tokens_per_s": sum(e["train_tokens"] for e in history) / sum(e["train_time"] for e in history),
    }


def _already_complete(cfg: TrainConfig, ckpt: dict, world: int, log: Callable[[str], None]) -> dict:
    """The result of resuming a run that has trained all its epochs: nothing is trained, no file written."""
    log(
        f"the run in {cfg.resume} is already complete ({ckpt['epoch']} of {cfg.epochs} epochs): "
        "nothing to train, no file written"
    )
    history = ckpt["history"]
    return {
        "config": dataclasses.asdict(cfg),
        "world_size": world,
        "epochs": history,
        "final": _final(history),
        "complete": True,
    }


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 709 else math.inf  # exp overflows a float from 709.8


def _row(e: dict) -> str:
    return (
        f"{e['epoch']:>5} {e['train_loss']:>10.4f} {e['valid_loss']:>10.4f} {e['valid_accuracy']:>8.4f} "
        f"{e['perplexity']:>10.3f} {e['tokens_per_s']:>9.0f} {e['time']:>5.1f}s"
    )
