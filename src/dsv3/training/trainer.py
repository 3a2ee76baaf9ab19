"""Training runs: the step (losses, accumulation, data parallelism, bias update), checkpoints, resume.

A run directory holds:

    RUN/config.json                 the model config
    RUN/train.json                  training options (resolved), tokenizer, corpus summary, MoE layer names
    RUN/metrics.jsonl               one JSON object per optimizer step
    RUN/checkpoints/step-00000100/  `save_pretrained` layout (fp32) + trainer_state.pt

A checkpoint is written under a temporary name and renamed into place, so a crash mid-save leaves
the previous one. trainer_state.pt holds only tensors and plain containers (optimizer, scheduler,
RNG states, step, data position) and is read with `torch.load(weights_only=True)`. The data order
is a function of (seed, step), so `--resume` continues exactly where the run stopped.

Batches. `--batch-size` is the GLOBAL number of sequences per optimizer step; it is split into
`--grad-accum` micro-batches and, under torchrun, over the processes (rank r takes a contiguous
share). Losses are normalised by global counts (losses.py), gradients are summed over processes
with one all-reduce, so the step does not depend on the world size or the accumulation, up to
rounding.

Model changes made from outside, for training only: the MTP modules share the main model's
embedding and output head (V3 section 2.2; the checkpoint stores copies, so saving unties them for
the write), activation checkpointing wraps each decoder layer's forward, and under --bf16 the
router's affinities are kept out of autocast (the spec wants them in float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, RequestError
from ..model.transformer import DeepSeekV3
from .balance import (
    all_reduce_counts,
    max_violation,
    moe_routers,
    reset_expert_counts,
    take_expert_counts,
    update_bias,
)
from .data import BatchOrder, Corpus, PackedWindows, iter_documents, load_tokenizer
from .losses import model_losses

STATE_FILE = "trainer_state.pt"
STATE_FORMAT = 1
ADAM_BETAS = (0.9, 0.95)  # V3 section 4.2
ADAM_EPS = 1e-8


@dataclass
class TrainOptions:
    """Everything that decides a run's trajectory, plus a few operational knobs (RESUME_MAY_CHANGE)."""

    data: list[str] = field(default_factory=list)
    data_glob: str | None = None
    tokenizer: str = "auto"
    steps: int = 1000
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 16  # global sequences per optimizer step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float | None = None  # None: lr / 10, as the V3 schedule ends at a tenth of the peak
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0  # max global grad norm; 0 turns clipping off
    mtp_weight: float = 0.3  # lambda: 0.3 for V3's first 10T tokens, then 0.1
    balance_alpha: float | None = None  # None: the config's aux_loss_alpha when seq_aux, else 0
    bias_update_speed: float = 0.001  # gamma: V3 uses 0.001 for the first 14.3T tokens
    init_bias_std: float = 0.0  # start from random routing biases (an imbalanced start)
    bf16: bool = False
    checkpoint_activations: bool = False
    save_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10  # 0: no log lines

    def validate(self) -> None:
        """Raise RequestError naming the first bad option."""
        positive = ["steps", "seq_len", "batch_size", "grad_accum", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) < 1:
                raise RequestError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in [
            "warmup",
            "weight_decay",
            "clip",
            "mtp_weight",
            "bias_update_speed",
            "init_bias_std",
            "save_every",
            "log_every",
        ]:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise RequestError(f"--{_flag(name)} must be >= 0, got {value}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise RequestError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise RequestError(f"--min-lr must be in [0, lr], got {self.min_lr}")
        if self.balance_alpha is not None and not (math.isfinite(self.balance_alpha) and self.balance_alpha >= 0):
            raise RequestError(f"--balance-alpha must be >= 0, got {self.balance_alpha}")
        if self.batch_size % self.grad_accum:
            raise RequestError(f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum}")


# Options a resumed run may change: none of them alters the trajectory of the steps already planned
# (--steps reshapes the cosine schedule from the resumed step on).
RESUME_MAY_CHANGE = ("steps", "save_every", "keep_checkpoints", "log_every")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def resume_options(saved: dict[str, Any], explicit: dict[str, Any]) -> TrainOptions:
    """A run's saved options with the command line's `explicit` values; trajectory options must not change."""
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"train.json has unknown option(s) {', '.join(unknown)}")
    _check_option_types(saved)
    opts = TrainOptions(**saved)
    for key, value in explicit.items():
        if key == "data":
            value = [os.path.abspath(p) for p in value]
        if key in RESUME_MAY_CHANGE:
            setattr(opts, key, value)
        elif getattr(opts, key) != value:
            raise RequestError(
                f"--{_flag(key)} {value} differs from the run's {getattr(opts, key)}; a resumed run keeps its "
                f"settings (only {', '.join('--' + _flag(k) for k in RESUME_MAY_CHANGE)} may change)"
            )
    return opts


def _check_option_types(saved: dict[str, Any]) -> None:
    """CheckpointError naming the first option of train.json whose JSON type does not fit TrainOptions."""
    accepted = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}
    for f in dataclasses.fields(TrainOptions):
        if f.name not in saved:
            continue
        value, kinds = saved[f.name], [k.strip() for k in str(f.type).split("|")]
        if "list[str]" in kinds:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            types = tuple(t for k in kinds for t in accepted[k])
            ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
            ok = ok and not (isinstance(value, float) and not math.isfinite(value))
        if not ok:
            raise CheckpointError(f"train.json: option {f.name} must be {f.type}, got {value!r}")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the torchrun job described by RANK/WORLD_SIZE (gloo on CPU, nccl on CUDA), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistEnv(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns)


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients over processes in one flat buffer (each rank's loss is already a share of the global one)."""
    for p in params:
        if p.grad is None:  # a parameter unused on this rank still takes part in the sum
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _broadcast_from_rank0(model: nn.Module) -> None:
    for t in model.state_dict().values():
        dist.broadcast(t, src=0)


# ---------------------------------------------------------------------------------------------- model wrapping
def tie_mtp_to_main(model: DeepSeekV3) -> None:
    """Make every MTP module use the main model's embedding and output head (V3 section 2.2)."""
    for layer in model.mtp:
        layer.embed_tokens.weight = model.model.embed_tokens.weight
        layer.shared_head.head.weight = model.lm_head.weight


@contextlib.contextmanager
def _untied_mtp(model: DeepSeekV3) -> Iterator[None]:
    """Give the MTP modules copies of the shared weights while saving: safetensors refuses shared memory."""
    for layer in model.mtp:
        layer.embed_tokens.weight = nn.Parameter(layer.embed_tokens.weight.detach().clone(), requires_grad=False)
        head = layer.shared_head.head
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    try:
        yield
    finally:
        tie_mtp_to_main(model)


def checkpoint_activations(model: DeepSeekV3) -> None:
    """Recompute each decoder layer (main and MTP) in the backward pass instead of keeping its activations."""
    for layer in [*model.model.layers, *model.mtp]:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def build_optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only, not on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


# ---------------------------------------------------------------------------------------------- run directory
class RunDir:
    """The files of one run (see the module doc)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.config = os.path.join(self.path, "config.json")
        self.train_json = os.path.join(self.path, "train.json")
        self.metrics = os.path.join(self.path, "metrics.jsonl")
        self.checkpoints = os.path.join(self.path, "checkpoints")

    def exists(self) -> bool:
        return os.path.isfile(self.train_json) or os.path.isdir(self.checkpoints)

    def checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step-{step:08d}")

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints (temporaries start with '.'), ascending."""
        if not os.path.isdir(self.checkpoints):
            return []
        names = [n for n in os.listdir(self.checkpoints) if n.startswith("step-") and n[5:].isdigit()]
        return sorted(int(n[5:]) for n in names if os.path.isfile(os.path.join(self.checkpoints, n, STATE_FILE)))

    def remove_stale_temporaries(self) -> list[str]:
        """Delete what a killed save left in checkpoints/ (returns the names); only provably stale ones.

        A save writes `.tmp-step-N.tmp-PID` (and save_pretrained `..tmp-step-N.tmp-PID.tmp-PID` inside
        it, `...old-PID` while swapping): such a name is removed when no process with any of its PIDs is
        alive. `.tmp-step-N` without a PID is the name older versions used, from a single rank-0 writer.
        """
        removed = []
        names = os.listdir(self.checkpoints) if os.path.isdir(self.checkpoints) else []
        for name in names:
            m = _TEMPORARY.match(name)
            if m is None or any(_pid_alive(int(pid)) for pid in re.findall(r"\.(?:tmp|old)-(\d+)", name)):
                continue
            shutil.rmtree(os.path.join(self.checkpoints, name), ignore_errors=True)
            removed.append(name)
        return removed

    def read_train_json(self) -> dict[str, Any]:
        try:
            with open(self.train_json, encoding="utf-8") as f:
                info = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is not a training run (no train.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.train_json}: not valid JSON ({e})") from None
        if not isinstance(info, dict) or not isinstance(info.get("options"), dict):
            raise CheckpointError(f"{self.train_json}: no 'options' object")
        return info

    def write_json(self, path: str, obj: dict[str, Any]) -> None:
        _atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines after `last_step` (written after the checkpoint we resume from)."""
        if not os.path.isfile(self.metrics):
            return
        kept = []
        with open(self.metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= last_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the crash
        _atomic_write_text(self.metrics, "".join(kept))


_TEMPORARY = re.compile(r"^\.{1,2}tmp-step-\d{8}((\.tmp-\d+)|(\.old-\d+))*$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process saves one checkpoint at a time: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, optimizer and schedule of one process; `step()` runs one global optimizer step."""

    def __init__(
        self, model: DeepSeekV3, opts: TrainOptions, windows: PackedWindows, env: DistEnv | None = None
    ) -> None:
        self.opts, self.windows, self.env = opts, windows, env or DistEnv()
        if opts.batch_size % (opts.grad_accum * self.env.world_size):
            raise RequestError(
                f"--batch-size {opts.batch_size} must be divisible by --grad-accum x processes "
                f"({opts.grad_accum} x {self.env.world_size})"
            )
        self.model = model.to(self.env.device).train()
        tie_mtp_to_main(self.model)
        if opts.checkpoint_activations:
            checkpoint_activations(self.model)
        named = moe_routers(self.model)
        self.router_names = [n for n, _ in named]
        self.routers = [r for _, r in named]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, opts)
        min_ratio = (opts.min_lr if opts.min_lr is not None else opts.lr / 10) / opts.lr
        schedule = functools.partial(lr_factor, warmup=opts.warmup, total=opts.steps, min_ratio=min_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.order = BatchOrder(len(windows), opts.seed)
        self.step_done = 0
        cfg = self.model.config
        self.balance_alpha = (
            opts.balance_alpha if opts.balance_alpha is not None else (cfg.aux_loss_alpha if cfg.seq_aux else 0.0)
        )

    def step(self) -> dict[str, Any]:
        """One optimizer step on the next global batch; returns its metrics (the same on every rank)."""
        t0 = time.perf_counter()
        opts, env, model = self.opts, self.env, self.model
        B = opts.batch_size
        step = self.step_done + 1
        batch = self.windows.batch(self.order.windows((step - 1) * B, B))  # the global batch, on every rank
        num_targets = batch.num_targets().to(env.device)
        per_rank = B // env.world_size
        micro = per_rank // opts.grad_accum
        mine = batch.rows(env.rank * per_rank, (env.rank + 1) * per_rank)

        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=env.device)  # lm, mtp, balance shares
        load = torch.zeros(len(self.routers), self._num_experts(), device=env.device)
        for a in range(opts.grad_accum):
            mb = mine.rows(a * micro, (a + 1) * micro).to(env.device)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                shares = model_losses(model, mb, self.routers, num_targets, B, opts.mtp_weight, self.balance_alpha)
            # Read the forward's routing now: activation checkpointing re-runs the routers in backward.
            load += take_expert_counts(self.routers).to(env.device)
            shares.total.backward()
            reset_expert_counts(self.routers)
            sums += torch.stack([shares.lm, shares.mtp, shares.balance]).float()
        if env.world_size > 1:
            _all_reduce_grads(self.params)
            dist.all_reduce(sums)
        load = all_reduce_counts(load)
        max_norm = opts.clip if opts.clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        # A non-finite gradient (a loss spike past fp range) would poison every weight: skip that update.
        # The norm is the same on every rank, so all of them skip together.
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            if opts.bias_update_speed:
                for router, layer_load in zip(self.routers, load):
                    update_bias(router, layer_load, opts.bias_update_speed)
        with warnings.catch_warnings():
            # The schedule follows the step count even when the update was skipped; torch warns about that.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.step_done = step

        lm, mtp, bal = sums.tolist()
        vio = max_violation(load).tolist()
        seconds = time.perf_counter() - t0
        return {
            "step": step,
            "loss": lm + opts.mtp_weight * mtp + bal,
            "lm_loss": lm,
            "mtp_loss": mtp,
            "balance_loss": bal,
            "maxvio": max(vio) if vio else 0.0,
            "maxvio_per_layer": [round(v, 6) for v in vio],
            "expert_load": load.round().long().tolist(),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": step * B * self.windows.seq_len,
            "tokens_per_s": round(B * self.windows.seq_len / seconds, 1),
            **({} if finite else {"skipped": True}),
        }

    def _num_experts(self) -> int:
        return self.routers[0].n_experts if self.routers else 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain containers (torch.load(weights_only=True) reads it)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # numpy's RNG is not used by training, so it is not saved.
        return {
            "format": STATE_FORMAT,
            "step": self.step_done,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": {"sequences_seen": self.step_done * self.opts.batch_size, "seed": self.opts.seed},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{STATE_FILE}: unknown format {state.get('format')!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_python_rng_state(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step_done = int(state["step"])
        if state["data"]["sequences_seen"] != self.step_done * self.opts.batch_size:
            raise CheckpointError(f"{STATE_FILE}: data position does not match step {self.step_done}")

    def save(self, run: RunDir) -> str | None:
        """Write checkpoint step-N atomically (rank 0) and prune old ones; returns its path on rank 0."""
        if not self.env.is_main:
            return None
        final = run.checkpoint_dir(self.step_done)
        run.remove_stale_temporaries()
        tmp = os.path.join(run.checkpoints, f".tmp-step-{self.step_done:08d}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with _untied_mtp(self.model):
            self.model.save_pretrained(tmp)
        torch.save(self.state_dict(), os.path.join(tmp, STATE_FILE))
        if os.path.isdir(final):  # the same step saved again after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        # Only checkpoints up to this step count: a later one left by the run we resumed past (it was
        # unreadable) must not push a good one out; it is replaced when the run reaches its step.
        done = [s for s in run.checkpoint_steps() if s <= self.step_done]
        for old in done[: -self.opts.keep_checkpoints]:
            shutil.rmtree(run.checkpoint_dir(old), ignore_errors=True)
        return final


def _as_python_rng_state(state: Any) -> tuple:
    # random.setstate wants tuples; a tensor-free pickle keeps them, but be lenient about lists.
    version, internal, gauss = state
    return int(version), tuple(int(x) for x in internal), gauss


def load_trainer_state(checkpoint_dir: str) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint, read without unpickling arbitrary objects."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint_dir} has no {STATE_FILE}") from None
    except Exception as e:  # a truncated or foreign file: pickle and zip errors of many kinds
        raise CheckpointError(f"{path}: cannot read trainer state ({e})") from None


def _load_latest_readable(
    run: RunDir, steps: list[int], env: DistEnv, say: Callable[[str], None]
) -> tuple[DeepSeekV3, dict[str, Any], str]:
    """(model, trainer state, directory) of the newest checkpoint that reads; older ones are tried in turn.

    A checkpoint that fails to read (a truncated shard, a corrupt trainer_state.pt) is left in place
    and named in a note; every rank reads the same files, so every rank picks the same one.
    """
    error: CheckpointError | None = None
    for step in reversed(steps):
        ckpt = run.checkpoint_dir(step)
        try:
            state = load_trainer_state(ckpt)
            model = DeepSeekV3.from_pretrained(ckpt, dtype=torch.float32, device=env.device)
        except CheckpointError as e:
            error = error or e
            say(f"note: cannot resume from {ckpt} ({e}); trying the previous checkpoint")
            continue
        if error is not None:
            say(f"note: resuming from {ckpt}")
        return model, state, ckpt
    raise error


# ---------------------------------------------------------------------------------------------- a run
def train(
    out: str,
    opts: TrainOptions,
    cfg: ModelConfig | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Train (or `resume`) the run in `out` up to opts.steps, or stop after step `stop_after`; returns the last step.

    A fresh run needs `cfg`; a resumed one reads RUN/config.json and continues from its latest checkpoint.
    """
    run = RunDir(out)
    env = init_distributed()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    say = log if env.is_main else (lambda line: None)
    try:
        return _train(run, opts, cfg, resume, stop_after, env, say)
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    run: RunDir,
    opts: TrainOptions,
    cfg: ModelConfig | None,
    resume: bool,
    stop_after: int | None,
    env: DistEnv,
    say: Callable[[str], None],
) -> int:
    opts.validate()
    if resume:
        steps = run.checkpoint_steps()
        if not steps:
            raise CheckpointError(f"--resume: {run.path} has no checkpoint to resume from")
        if env.is_main:
            for name in run.remove_stale_temporaries():
                say(f"removed {name}, left in {run.checkpoints} by a save that did not finish")
        info = run.read_train_json()
        cfg = ModelConfig.from_pretrained(run.config)
    else:
        if cfg is None:
            raise ConfigError("a new run needs a model config (--config)")
        if run.exists():
            raise RequestError(f"{run.path} already holds a run: pass --resume to continue it, or another --out")
        if not opts.data:
            raise RequestError("a new run needs --data")
        if env.world_size > 1:
            dist.barrier()  # every rank has seen the directory empty before rank 0 fills it
        cfg = cfg.replace(quantization_config=None)  # training keeps fp32 master weights, never FP8
        opts.data = [os.path.abspath(p) for p in opts.data]
    if opts.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {opts.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")

    tokenizer = load_tokenizer(opts.tokenizer, cfg.vocab_size)
    opts.tokenizer = tokenizer.name
    corpus = Corpus.from_documents(iter_documents(opts.data, opts.data_glob), tokenizer)
    windows = PackedWindows(corpus, opts.seq_len, cfg.num_nextn_predict_layers)
    corpus_info = {
        "documents": corpus.num_docs,
        "tokens": len(corpus),
        "sequences": len(windows),
        "fingerprint": corpus.fingerprint(),
        "unigram_entropy_nats": round(corpus.unigram_entropy(), 6),
    }

    if resume:
        if info.get("corpus", {}).get("fingerprint") != corpus_info["fingerprint"]:
            raise CheckpointError(
                f"the data under {', '.join(opts.data)} is not what the run started with (fingerprint "
                f"{corpus_info['fingerprint']} != {info.get('corpus', {}).get('fingerprint')})"
            )
        model, state, _ = _load_latest_readable(run, steps, env, say)
    else:
        if opts.min_lr is None:
            opts.min_lr = opts.lr / 10
        if opts.balance_alpha is None:
            opts.balance_alpha = cfg.aux_loss_alpha if cfg.seq_aux else 0.0
        torch.manual_seed(opts.seed)
        model = DeepSeekV3(cfg)
        if opts.init_bias_std:
            g = torch.Generator().manual_seed(opts.seed)
            for _, router in moe_routers(model):
                bias = router.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=g) * opts.init_bias_std)
    trainer = Trainer(model, opts, windows, env)
    if resume:
        trainer.load_state_dict(state)
    elif env.world_size > 1:
        _broadcast_from_rank0(trainer.model)

    if env.is_main:
        os.makedirs(run.checkpoints, exist_ok=True)
        if resume:
            run.truncate_metrics(trainer.step_done)
            info["options"] = dataclasses.asdict(opts)  # operational changes (--steps, ...) are kept
        else:
            cfg.save(run.config)
            info = {
                "format": 1,
                "options": dataclasses.asdict(opts),
                "corpus": corpus_info,
                "moe_layers": trainer.router_names,
                "parameters": trainer.model.num_parameters(include_mtp=True),
                "world_size": env.world_size,
            }
            open(run.metrics, "w").close()
        run.write_json(run.train_json, info)
    say(
        f"corpus: {corpus.num_docs:,} documents, {len(corpus):,} tokens ({tokenizer.name} tokenizer), "
        f"unigram entropy {corpus_info['unigram_entropy_nats']:.4f} nats/token, {len(windows):,} sequences of "
        f"{opts.seq_len}; model: {trainer.model.num_parameters(include_mtp=True):,} parameters, "
        f"{len(trainer.routers)} MoE layers; {env.world_size} process(es)"
    )
    return _loop(trainer, run, stop_after, say)


def _loop(trainer: Trainer, run: RunDir, stop_after: int | None, say: Callable[[str], None]) -> int:
    from tqdm import tqdm

    opts, env = trainer.opts, trainer.env
    last = opts.steps if stop_after is None else min(opts.steps, stop_after)
    if trainer.step_done >= last:
        say(f"nothing to do: the run is at step {trainer.step_done}")
        return trainer.step_done
    show_bar = env.is_main and sys.stderr.isatty()
    metrics_file = open(run.metrics, "a", encoding="utf-8") if env.is_main else None
    t_start = time.perf_counter()
    try:
        with tqdm(
            total=opts.steps,
            initial=trainer.step_done,
            disable=not show_bar,
            file=sys.stderr,
            dynamic_ncols=True,
            unit="step",
        ) as bar:
            while trainer.step_done < last:
                m = trainer.step()
                m["elapsed_s"] = round(time.perf_counter() - t_start, 3)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(m, separators=(",", ":")) + "\n")
                    metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", maxvio=f"{m['maxvio']:.2f}", refresh=False)
                step = m["step"]
                if opts.log_every and (step % opts.log_every == 0 or step == last):
                    line = (
                        f"step {step}/{opts.steps} loss {m['loss']:.4f} lm {m['lm_loss']:.4f} "
                        f"mtp {m['mtp_loss']:.4f} bal {m['balance_loss']:.2e} maxvio {m['maxvio']:.3f} "
                        f"lr {m['lr']:.2e} gnorm {m['grad_norm']:.2f} {m['tokens_per_s']:,.0f} tok/s"
                    )
                    if show_bar:
                        bar.write(line, file=sys.stderr)
                    else:
                        say(line)
                if (opts.save_every and step % opts.save_every == 0) or step == last:
                    trainer.save(run)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    say(f"step {trainer.step_done}: checkpoint in {run.checkpoint_dir(trainer.step_done)}")
    return trainer.step_done
