"""`rnnlm train | generate | bench`: the command line (also `python -m rnnlm_ext.lm.cli`, for torchrun)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

import torch

from rnnlm_ext.lm import data, models
from rnnlm_ext.lm.train import RNN_CLASSES, TrainConfig, TrainingError, load_checkpoint, model_from_checkpoint, train


def _train_parser(sub) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = sub.add_parser("train", help="train a language model with stateful truncated BPTT (defaults: the main job)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", default=d.dataset, help="'human-numbers', or a text file or folder of .txt files")
    p.add_argument("--level", default=d.level, choices=["word", "char"], help="tokens: words or characters")
    p.add_argument("--min-freq", type=int, default=d.min_freq,
                   help="rarer tokens become <unk> (text data sets; human-numbers keeps its whole vocabulary)")
    p.add_argument("--max-vocab", type=int, default=d.max_vocab,
                   help="keep this many most frequent tokens, plus <unk> (text data sets, as --min-freq)")
    p.add_argument("--model", default=d.model, choices=models.MODELS,
                   help="rnn: RNNLM on --rnn; seed: the seed's shared-weight cell; lmmodel1-4: fastbook's")
    p.add_argument("--rnn", default=d.rnn, choices=sorted(RNN_CLASSES), help="recurrent layer of --model rnn")
    p.add_argument("--layers", type=int, default=d.layers, help="recurrent layers")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden units per layer (also the embedding size)")
    p.add_argument("--nonlinearity", default=d.nonlinearity, choices=["relu", "tanh"], help="the recurrent activation")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability in [0, 1)")
    p.add_argument("--tie-weights", action="store_true", help="share the embedding with the output layer")
    p.add_argument("--bptt", type=int, default=d.bptt, help="tokens per batch row (truncated BPTT length)")
    p.add_argument("--bs", type=int, default=d.bs, help="batch rows per process")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the train stream")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--wd", type=float, default=d.wd, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=d.clip, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, dropout and sampling")
    p.add_argument("--save", metavar="DIR", help="write DIR/checkpoint.pt (atomically) after every epoch")
    p.add_argument("--save-every", type=int, default=d.save_every, metavar="STEPS",
                   help="also checkpoint every STEPS steps (0: at the end of each epoch only)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="stop after STEPS steps in all (checkpointed with --save)")
    p.add_argument("--resume", metavar="DIR", help="continue the run checkpointed in DIR exactly, with its settings (a flag that would change one is an error)")
    p.add_argument("--json", metavar="PATH", help="write per-epoch metrics and final results as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="a progress bar per epoch (without the flag: on a terminal only)")
    return p


def _given(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """The destinations of the options written out in argv (abbreviations are off)."""
    written = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return [action.dest for action in parser._actions if written & set(action.option_strings)]


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a folder written by `rnnlm train --save`")
    p.add_argument("--prompt", required=True, help="text to start from (its tokens must be in the vocabulary, or map to <unk>)")
    p.add_argument("--tokens", type=int, default=30, help="how many tokens to sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0: always the most likely token")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")


@torch.no_grad()
def generate(model, vocab: data.Vocab, level: str, prompt: str, n_tokens: int, temperature: float = 1.0,
             seed: int = 0) -> str:
    """The prompt followed by n_tokens sampled one at a time, the hidden state carried through the prompt.

    Stateful models read the prompt once and then one token per step; the seed's stateless ones
    are given the last tokens again at every step (their whole context).
    """
    if n_tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {n_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: the most likely token), got {temperature}")
    tokens = list(prompt) if level == "char" else prompt.split()
    if not tokens:
        raise ValueError("--prompt must hold at least one token")
    # LMModel1 reads exactly its first three tokens: give it the last three, not the first
    context = 3 if type(model) is models.LMModel1 else len(tokens)
    if len(tokens) < context:
        raise ValueError(f"--prompt must hold at least {context} tokens for lmmodel1, got {len(tokens)}")
    ids = vocab.encode(tokens)  # [N]
    gen = torch.Generator().manual_seed(seed)
    stateful = hasattr(model, "reset")
    models.reset_state(model)
    x = ids[None, -context:]  # [1,N] (the last three for LMModel1)
    out = []
    for _ in range(n_tokens):
        logits = model(x)
        logits = logits[0, -1] if getattr(model, "predicts_all", False) else logits[0]  # [V]
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
        x = ids[None, -1:] if stateful else ids[None, -x.shape[1]:]
    sep = "" if level == "char" else " "
    return sep.join(tokens + vocab.decode(out))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from rnnlm_ext import benchmark  # the kernel benchmarks, imported only when asked for

        benchmark.main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="rnnlm", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = _train_parser(sub)
    _generate_parser(sub)
    sub.add_parser("bench", help="benchmark the fused layer (see `rnnlm bench --help`)", add_help=False)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"})
            # Late in training, values below float32's normal range appear and every operation
            # on them takes a slow microcode path: throughput fell from 97k to 67k tokens/s over
            # the main job's epochs. Flushing them to zero keeps it flat, with the same losses.
            torch.set_flush_denormal(True)
            result = train(cfg, given=_given(train_parser, argv[1:]))
            if "signal" in result:
                return 128 + result["signal"]  # stopped by Ctrl-C or SIGTERM, checkpointed with --save
            if "final" in result and "stopped_at_step" not in result and os.environ.get("RANK", "0") == "0":
                f = result["final"]
                print(f"final: valid_loss {f['valid_loss']:.4f}  valid_accuracy {f['valid_accuracy']:.4f}  "
                      f"perplexity {f['perplexity']:.3f}  tokens/s {f['tokens_per_s']:.0f}")
        else:
            model, vocab, cfg = model_from_checkpoint(load_checkpoint(args.checkpoint))
            print(generate(model, vocab, cfg.level, args.prompt, args.tokens, args.temperature, args.seed))
    except (ValueError, FileNotFoundError, KeyError, TrainingError) as err:
        # a KeyError's str() is the repr of its message; an OSError's args[0] is its errno
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"rnnlm {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
