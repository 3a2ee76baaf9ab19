"""`dsv3 train` and `dsv3 plot`: the training subcommands, registered by `add_commands(subparsers)`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, RequestError

if TYPE_CHECKING:
    from ..config import ModelConfig


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `train` and `plot` on the CLI's subparsers; each sets fn(args) -> exit code."""
    from .trainer import TrainOptions

    d = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.default is not dataclasses.MISSING}

    def opt(parser: argparse.ArgumentParser, flag: str, type_: type, help_: str) -> None:
        # Default None: a resumed run tells explicit values from defaults (it keeps its own settings).
        name = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=type_, default=None, help=f"{help_} (default: {d[name]})")

    s = subparsers.add_parser(
        "train",
        help="train a model on a text corpus (aux-loss-free balancing, balance loss, MTP loss)",
        description="Train on text files, folders or JSONL ('text' field). Under torchrun, data-parallel "
        "over the processes. RUN gets config.json, train.json, metrics.jsonl and checkpoints/.",
    )
    s.add_argument("--config", help="preset name, config.json or checkpoint dir (a new run only)")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (value parsed as JSON, else a string); repeatable",
    )
    s.add_argument("--data", nargs="+", default=None, metavar="PATH", help="text files, folders or .jsonl files")
    s.add_argument(
        "--data-glob", default=None, help="only files whose name matches this pattern inside folders (e.g. '*.py')"
    )
    s.add_argument("--out", required=True, metavar="RUN", help="run directory")
    s.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint")
    s.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop (with a checkpoint) after this step; continue later with --resume",
    )
    s.add_argument(
        "--tokenizer",
        default=None,
        metavar="{auto,deepseek,byte,DIR}",
        help="deepseek: the V3 tokenizer; byte: UTF-8 bytes + 2, BOS 0, EOS 1; auto: deepseek when "
        "the config's vocab_size holds it, else byte; DIR: a folder with tokenizer.json and "
        "tokenizer_config.json (default: auto)",
    )
    opt(s, "--steps", int, "optimizer steps")
    opt(s, "--seed", int, "seed of the weights and the data order")
    opt(s, "--seq-len", int, "tokens per sequence")
    opt(s, "--batch-size", int, "sequences per optimizer step, over all processes and micro-batches")
    opt(s, "--grad-accum", int, "micro-batches per optimizer step")
    opt(s, "--lr", float, "peak learning rate (AdamW, betas 0.9/0.95)")
    opt(s, "--min-lr", float, "final learning rate of the cosine decay (None: lr/10)")
    opt(s, "--warmup", int, "linear warmup steps")
    opt(s, "--weight-decay", float, "AdamW weight decay on matrices and embeddings")
    opt(s, "--clip", float, "max global gradient norm, 0 = off")
    opt(s, "--mtp-weight", float, "lambda of the MTP loss (V3: 0.3, later 0.1)")
    opt(
        s,
        "--balance-alpha",
        float,
        "alpha of the sequence-wise balance loss (None: the config's aux_loss_alpha "
        "when seq_aux; the V3 report used 0.0001)",
    )
    opt(s, "--bias-update-speed", float, "gamma of the aux-loss-free bias update, 0 = off")
    opt(s, "--init-bias-std", float, "start from routing biases ~ N(0, std): an imbalanced start")
    opt(s, "--save-every", int, "checkpoint every N steps (0: only at the end)")
    opt(s, "--keep-checkpoints", int, "checkpoints kept in RUN/checkpoints")
    opt(s, "--log-every", int, "a log line every N steps on stderr (0: none)")
    s.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (weights stay fp32)")
    s.add_argument(
        "--checkpoint-activations",
        action="store_true",
        default=None,
        help="recompute each layer in the backward pass to save memory",
    )
    s.set_defaults(fn=cmd_train)

    s = subparsers.add_parser("plot", help="PNG plots of training runs: losses, MaxVio, expert load per layer")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run directories (several: curves overlaid)")
    s.add_argument("--out", default=None, help="output folder (default: RUN/plots of the first run)")
    s.set_defaults(fn=cmd_plot)


def cmd_train(args: argparse.Namespace) -> int:
    """Start or resume a run (see `dsv3 train --help`)."""
    from .trainer import RunDir, TrainOptions, resume_options, train

    names = [f.name for f in dataclasses.fields(TrainOptions)]
    explicit = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.stop_after is not None and args.stop_after < 1:
        raise RequestError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.resume:
        if args.config or args.set:
            raise RequestError("--config and --set do not go with --resume: the run keeps RUN/config.json")
        opts = resume_options(RunDir(args.out).read_train_json()["options"], explicit)
        cfg = None
    else:
        if not args.config:
            raise RequestError("a new run needs --config (a preset name or a config.json)")
        cfg = build_config(args.config, args.set)
        opts = TrainOptions(**explicit)
    last = train(args.out, opts, cfg, resume=args.resume, stop_after=args.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.out}: step {last}")
    return 0


def build_config(config: str, sets: list[str]) -> ModelConfig:
    """ModelConfig from a preset/path plus `KEY=VALUE` overrides naming real config keys."""
    from ..config import ModelConfig  # the runtime import of the TYPE_CHECKING name

    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    overrides: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RequestError(f"--set wants KEY=VALUE, got {item!r}")
        if key not in fields:
            raise ConfigError(f"--set {key}: not a config key (keys: {', '.join(sorted(fields))})")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return ModelConfig.from_pretrained(config, **overrides)


def cmd_plot(args: argparse.Namespace) -> int:
    """Write the PNGs of one or more runs."""
    from .plot import plot_runs

    out = args.out or os.path.join(args.runs[0], "plots")
    for path in plot_runs(args.runs, out):
        print(path)
    return 0
