"""`rnnlm train | generate | bench`: the command line (also `python -m rnnlm_ext.lm.cli`, for torchrun)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
import warnings

from rnnlm_ext import benchmark
from rnnlm_ext.lm.errors import CheckpointWarning, TrainingError
from rnnlm_ext.lm.generate import generate
from rnnlm_ext.lm.train import (
    MODEL_DEFAULTS,
    TrainConfig,
    load_checkpoint,
    model_default_help,
    model_from_checkpoint,
    train,
)


def _train_parser(sub) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The train subcommand, one flag per TrainConfig field; returns it and {field: flag}."""
    p = sub.add_parser(
        "train",
        help="train a language model with stateful truncated BPTT",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
        description="A setting left unset takes its model's value: the main job's for rnn and shared, "
        "the book's for lmmodel1-7 (so `rnnlm train --model lmmodel7` alone is chapter 12's LMModel7 run).",
    )
    types = typing.get_type_hints(TrainConfig)
    flags = {}
    for f in dataclasses.fields(TrainConfig):
        cli = dict(f.metadata)
        flag, help = cli.pop("flag", "--" + f.name.replace("_", "-")), cli.pop("help")
        # Optional[X] -> X
        kind = next((t for t in typing.get_args(types[f.name]) if t is not type(None)), types[f.name])
        # unset: the model's value (the book's for its models), which the help spells out
        per_model = f.name in MODEL_DEFAULTS["rnn"]
        if per_model:
            help += f" (default: {model_default_help(f.name)})"
        if kind is bool and f.default is None:  # unset means "decide for me": --x, --no-x or neither
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help
            )
        elif kind is bool:
            p.add_argument(flag, dest=f.name, action="store_true", help=help)
        else:
            default = argparse.SUPPRESS if per_model else f.default
            p.add_argument(flag, dest=f.name, type=kind, default=default, help=help, **cli)
        flags[f.name] = flag
    return p, flags


def _generate_parser(sub) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    p = sub.add_parser(
        "generate", help="sample text from a trained model", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a folder written by `rnnlm train --save`")
    p.add_argument(
        "--prompt", required=True, help="text to start from (its tokens must be in the vocabulary, or map to <unk>)"
    )
    p.add_argument("--tokens", dest="n_tokens", type=int, default=30, help="how many tokens to sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0: always the most likely token")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    flags = {
        "checkpoint": "--checkpoint",
        "prompt": "--prompt",
        "n_tokens": "--tokens",
        "temperature": "--temperature",
        "seed": "--seed",
    }
    return p, flags


def _fields_on_command_line(flags: dict[str, str], argv: list[str]) -> list[str]:
    """The fields whose flags argv writes out (abbreviations are off; --no-x sets x)."""
    written = {a.split("=", 1)[0].replace("--no-", "--", 1) for a in argv if a.startswith("--")}
    return [name for name, flag in flags.items() if flag in written]


def _in_flags(err: Exception, flags: dict[str, str]) -> str:
    """The error's message with the parameters it names written as the command's flags."""
    # a KeyError's str() is the repr of its message
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    names = set(getattr(err, "names", ()))
    leading = re.match(r"(\w+): ", message)  # "save: cannot write to the folder ..."
    if leading:
        names.add(leading.group(1))
    for name in names & set(flags):
        # a whole word, not part of a path, a file name or another word
        message = re.sub(rf"(?<![\w/.'-]){name}(?![\w/'-]|\.\w)", flags[name], message)
    return message


def _show_warning(command: str, flags: dict[str, str], default):
    """warnings.showwarning that writes a CheckpointWarning as the command's own line, with flags for names."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            print(f"rnnlm {command}: warning: {_in_flags(message, flags)}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="rnnlm", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _, train_flags = _train_parser(sub)
    _, generate_flags = _generate_parser(sub)
    bench_parser = sub.add_parser(
        "bench",
        help="benchmark a fused layer (--cell rnn, lstm or gru) against torch.nn's",
        description=benchmark.__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    benchmark.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    command = args.command
    del args.command
    if command == "bench":
        benchmark.run(args, bench_parser.error)
        return 0
    flags = train_flags if command == "train" else generate_flags
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)
        warnings.showwarning = _show_warning(command, flags, warnings.showwarning)
        try:
            if command == "train":
                result = train(TrainConfig(**vars(args)), explicit=_fields_on_command_line(train_flags, argv[1:]))
                if "signal" in result:
                    return 128 + result["signal"]  # stopped by Ctrl-C or SIGTERM, checkpointed with --save
                if "final" in result and "stopped_at_step" not in result and os.environ.get("RANK", "0") == "0":
                    f = result["final"]
                    print(
                        f"final: valid_loss {f['valid_loss']:.4f}  valid_accuracy {f['valid_accuracy']:.4f}  "
                        f"perplexity {f['perplexity']:.3f}  tokens/s {f['tokens_per_s']:.0f}"
                    )
            else:
                model, vocab, cfg = model_from_checkpoint(load_checkpoint(args.checkpoint, "checkpoint"))
                print(generate(model, vocab, cfg.level, args.prompt, args.n_tokens, args.temperature, args.seed))
        except (ValueError, FileNotFoundError, KeyError, TrainingError) as err:
            print(f"rnnlm {command}: error: {_in_flags(err, flags)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
