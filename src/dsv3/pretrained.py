"""The model that ships inside the package, and what the CLI's `--model` names.

`stdlib-mini` (in `dsv3/assets/stdlib-mini/`, official layout, FP8 projections) is a 1.5M-parameter
DeepSeek-V3 trained by `scripts/train_default_model.py` on the Python standard library with a
byte-level tokenizer (docs/training.md, "The shipped model"). It is the default of `dsv3 demo`,
`generate`, `chat` and `serve`.

`--model` takes a checkpoint directory, `random:CONFIG` (random weights of a preset or config.json,
built in memory, with the DeepSeek-V3 tokenizer: every command works but writes random text), or
nothing (the shipped model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RequestError

DEFAULT_MODEL = "stdlib-mini"
RANDOM_PREFIX = "random:"
_ASSETS = Path(__file__).resolve().parent / "assets"


def packaged_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a model shipped with the package."""
    path = _ASSETS / name
    if not (path / "config.json").is_file():
        raise RequestError(f"the packaged model {name!r} is missing from {_ASSETS} (a broken install?)")
    return path


@dataclass(frozen=True)
class ModelChoice:
    """Where a command's model comes from: a checkpoint directory, or a config to build with random weights."""

    checkpoint: str | None = None
    random_config: str | None = None

    @property
    def is_random(self) -> bool:
        return self.random_config is not None

    @property
    def name(self) -> str:
        """A short model id: the checkpoint's folder name, or dsv3-PRESET-random."""
        if self.random_config is not None:
            cfg = self.random_config
            preset = cfg if "/" not in cfg and not cfg.endswith(".json") else "config"
            return f"dsv3-{preset}-random"
        return os.path.basename(os.path.normpath(self.checkpoint or ""))


def resolve_model(value: str | None) -> ModelChoice:
    """`--model VALUE` (None: the shipped model) as a ModelChoice."""
    if value is None:
        return ModelChoice(checkpoint=str(packaged_model_dir()))
    if value.startswith(RANDOM_PREFIX):
        config = value[len(RANDOM_PREFIX) :]
        if not config:
            raise RequestError("--model random:CONFIG needs a preset name or a config.json (e.g. random:small)")
        return ModelChoice(random_config=config)
    return ModelChoice(checkpoint=value)
