"""ModelConfig: the HuggingFace `config.json` of DeepSeek-V3 as one flat, validated dataclass.

Keys are the HF ones of the seed. Derived values (`qk_head_dim`, `moe_layer_indices`, ...) are
properties so they are never stored twice. `rope_scaling` in the old style (`{"type": "yarn"}`) and
`rope_parameters` in the new style (`{"rope_type": "yarn", "rope_theta": ...}`) both load and are
normalised to `rope_theta` + old-style `rope_scaling`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import ConfigError
from .presets import PRESETS

SUPPORTED_ACT = ("silu",)
SUPPORTED_ROPE_TYPES = ("yarn", "default", "linear")
LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: fixed in the reference code, whatever rms_norm_eps says


class Family(NamedTuple):
    """One `model_type` dsv3 runs: its checkpoints, accepted `architectures`, and routing."""

    name: str
    architectures: tuple[str, ...]
    scoring_func: str
    topk_methods: tuple[str, ...]


# Kimi-K2 and Moonlight are DeepSeek-V3 networks: Kimi-K2 says `model_type: kimi_k2` with the V3
# architecture, Moonlight-16B-A3B says `deepseek_v3`. DeepSeek-V2 / V2-Lite / V2.5 differ in routing.
FAMILIES = {
    "deepseek_v3": Family(
        "DeepSeek-V3 (V3, R1, V3-0324, V3.1, Moonlight)", ("DeepseekV3ForCausalLM",), "sigmoid", ("noaux_tc",)
    ),
    "kimi_k2": Family("Kimi-K2", ("DeepseekV3ForCausalLM",), "sigmoid", ("noaux_tc",)),
    "deepseek_v2": Family(
        "DeepSeek-V2 (V2, V2-Lite, V2.5)", ("DeepseekV2ForCausalLM",), "softmax", ("greedy", "group_limited_greedy")
    ),
}
# Relatives dsv3 does not run, refused by name rather than as "an unknown model_type".
REFUSED_MODEL_TYPES = {
    "deepseek_v32": "DeepSeek-V3.2-Exp (DeepSeek Sparse Attention)",
    "deepseek": "DeepSeek-MoE (V1)",
    "kimi_linear": "Kimi-Linear",
}
# Config keys whose presence means a computation dsv3 does not implement: key -> the checkpoint family.
REFUSED_KEYS = {
    "index_n_heads": "DeepSeek-V3.2-Exp (DeepSeek Sparse Attention)",
    "index_head_dim": "DeepSeek-V3.2-Exp (DeepSeek Sparse Attention)",
    "index_topk": "DeepSeek-V3.2-Exp (DeepSeek Sparse Attention)",
}
INT4_METHOD = "compressed-tensors"  # Kimi-K2-Thinking: routed experts in INT4, grouped scales


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    ep_size: int = 1
    pretraining_tp: int = 1
    use_cache: bool = True
    torch_dtype: str | None = "bfloat16"
    model_type: str = "deepseek_v3"
    quantization_config: dict | None = None
    # Keys we do not interpret (auto_map, _name_or_path, ...): kept so a saved config round-trips.
    extra: dict = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a HF-style dict; unknown keys are kept in `extra`; the result is validated."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters is not None:
            theta, scaling = _from_rope_parameters(rope_parameters)
            if theta is not None:
                d["rope_theta"] = theta
            if "rope_scaling" not in d or d["rope_scaling"] is None:
                d["rope_scaling"] = scaling
        # transformers calls the MTP depth num_mtp_layers; the checkpoint's config calls it num_nextn.
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if d.get("topk_method") == "greedy":  # V2-Lite style: groups play no part; transformers may write null
            for key in ("n_group", "topk_group"):
                if key in d and d[key] is None:
                    d[key] = 1
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls(**known, extra=extra)
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
        """A preset name, a `config.json` path, or a checkpoint directory holding one."""
        src = os.fspath(name_or_path)
        if src in PRESETS:
            d = dict(PRESETS[src])
        else:
            path = os.path.join(src, "config.json") if os.path.isdir(src) else src
            if not os.path.isfile(path):
                raise ConfigError(f"no preset or config file named {src!r} (presets: {', '.join(sorted(PRESETS))})")
            try:
                with open(path, encoding="utf-8") as f:
                    d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{src}: config must be a JSON object")
        d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """HF-style dict (old-style `rope_scaling`), ready for `config.json`."""
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        family = FAMILIES.get(self.model_type)
        d.setdefault("architectures", list(family.architectures[:1]) if family else ["DeepseekV3ForCausalLM"])
        return d

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes: Any) -> ModelConfig:
        d = self.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d)

    # ----------------------------------------------------------------- derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers before `first_k_dense_replace` are dense, then every `moe_layer_freq`-th is MoE."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent plus the one shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type") or self.rope_scaling.get("rope_type") or "default"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN (the official code)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim") or 0
            factor = float(self.rope_scaling.get("factor", 1.0))
            if mscale_all_dim and factor > 1:
                scale = scale * yarn_mscale(factor, mscale_all_dim) ** 2
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        """The `weight_block_size` of an FP8 config, else None."""
        q = self.quantization_config
        if not q or q.get("quant_method") != "fp8":
            return None
        bs = q.get("weight_block_size", [128, 128])
        return int(bs[0]), int(bs[1])

    @property
    def fp8_scale_fmt(self) -> str | None:
        """`quantization_config.scale_fmt` of an FP8 config ("ue8m0": power-of-two scales, V3.1), else None."""
        if self.fp8_block_size is None:
            return None
        return self.quantization_config.get("scale_fmt")

    @property
    def int4_group_size(self) -> int | None:
        """Group size of an INT4 `compressed-tensors` config (Kimi-K2-Thinking: 32), else None."""
        q = self.quantization_config
        if not q or q.get("quant_method") != INT4_METHOD:
            return None
        return _int4_weights(q)["group_size"]

    @property
    def family(self) -> str:
        """The checkpoint family this config belongs to, for messages and `dsv3 params`."""
        return FAMILIES[self.model_type].name

    @property
    def uses_correction_bias(self) -> bool:
        """Whether the router has `e_score_correction_bias` (V3's aux-loss-free `noaux_tc`; not V2)."""
        return self.topk_method == "noaux_tc"

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and why."""
        positive = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "moe_layer_freq",
        ]
        for name in positive:
            _require_int(name, getattr(self, name), minimum=1)
        for name in ["first_k_dense_replace", "n_shared_experts", "n_routed_experts", "num_nextn_predict_layers"]:
            _require_int(name, getattr(self, name), minimum=0)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None:
            _require_int("q_lora_rank", self.q_lora_rank, minimum=1)
        if any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)) or self.num_nextn_predict_layers:
            self._validate_moe()
        if self.first_k_dense_replace > 0 or self.moe_layer_freq > 1 or self.n_routed_experts == 0:
            _require_int("intermediate_size", self.intermediate_size, minimum=1)
        if self.hidden_act not in SUPPORTED_ACT:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(SUPPORTED_ACT)})"
            )
        for name in ["rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"]:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if not self.rope_theta > 1:  # rope divides by log(rope_theta)
            raise ConfigError(f"rope_theta must be > 1, got {self.rope_theta!r}")
        _check_size_bounds(self)
        _check_token_ids_and_flags(self)
        self._validate_rope()
        self._validate_quantization()
        self._validate_family()

    def _validate_moe(self) -> None:
        for name in ["n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_intermediate_size"]:
            _require_int(name, getattr(self, name), minimum=1)
        self._validate_routing()
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})")
        if self.experts_per_group < 2 and self.n_group > 1 and self.topk_method == "noaux_tc":
            raise ConfigError(
                f"each group needs at least 2 experts for the top-2 group score, got "
                f"n_routed_experts/n_group = {self.experts_per_group}"
            )
        kept = self.topk_group * self.experts_per_group
        if self.num_experts_per_tok > kept and self.topk_method != "greedy":
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the kept groups "
                f"(topk_group * n_routed_experts / n_group = {kept})"
            )

    def _validate_rope(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling must be an object or null, got {rs!r}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.rope_type in ("yarn", "linear"):
            factor = rs.get("factor")
            if not _is_number(factor) or not factor > 0:
                raise ConfigError(f"rope_scaling.factor must be a positive finite number, got {factor!r}")
        _check_rope_numbers(rs)
        if self.rope_type == "yarn":
            omp = rs.get("original_max_position_embeddings")
            if not isinstance(omp, int) or isinstance(omp, bool) or omp < 1:
                raise ConfigError(
                    f"rope_scaling.original_max_position_embeddings must be a positive integer, got {omp!r}"
                )

    def _validate_quantization(self) -> None:
        q = self.quantization_config
        if q is None:
            return
        if not isinstance(q, dict):
            raise ConfigError(f"quantization_config must be an object or null, got {q!r}")
        method = q.get("quant_method")
        if method == INT4_METHOD:
            _int4_weights(q)
            return
        if method != "fp8":
            raise ConfigError(
                f"quantization_config.quant_method {method!r} is not supported (supported: fp8, {INT4_METHOD})"
            )
        if q.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config.fmt {q.get('fmt')!r} is not supported (supported: e4m3)")
        if "weight_block_size" not in q or q["weight_block_size"] is None:
            raise ConfigError(
                "quantization_config has no weight_block_size: per-tensor FP8 is not supported "
                "(dsv3 reads block-scaled FP8, as DeepSeek-V3's weight_block_size [128, 128])"
            )
        bs = q["weight_block_size"]
        if (
            not isinstance(bs, (list, tuple))
            or len(bs) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)
        ):
            raise ConfigError(f"quantization_config.weight_block_size must be two positive integers, got {bs!r}")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(
                f"quantization_config.activation_scheme {q.get('activation_scheme')!r} is not supported "
                "(supported: dynamic)"
            )
        if q.get("scale_fmt") not in (None, "ue8m0"):
            raise ConfigError(
                f"quantization_config.scale_fmt {q.get('scale_fmt')!r} is not supported (supported: ue8m0, or none)"
            )

    # ----------------------------------------------------------------- family (model_type, routing, refused keys)
    def _validate_family(self) -> None:
        """model_type / architectures name a family dsv3 runs; keys of relatives it does not run are refused."""
        for key, family in REFUSED_KEYS.items():
            if self.extra.get(key) is not None:
                raise ConfigError(f"config key {key!r}: {family} is not supported")
        if self.model_type in REFUSED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r}: {REFUSED_MODEL_TYPES[self.model_type]} is not supported"
            )
        if self.model_type not in FAMILIES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not a DeepSeek-V3 family model (supported: {', '.join(FAMILIES)})"
            )
        family = FAMILIES[self.model_type]
        archs = self.extra.get("architectures")
        if archs is not None:
            if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
                raise ConfigError(f"architectures must be a list of class names, got {archs!r}")
            unknown = [a for a in archs if a not in family.architectures]
            if unknown:
                raise ConfigError(
                    f"architectures {unknown[0]!r} is not a {family.name} architecture "
                    f"(model_type {self.model_type!r} expects {', '.join(family.architectures)})"
                )
        if self.attention_bias:
            raise ConfigError(
                "attention_bias: true (biases on q_a_proj, kv_a_proj_with_mqa and o_proj) is not supported; "
                "no published DeepSeek-V2/V3-family checkpoint sets it"
            )
        if self.extra.get("mlp_bias"):
            raise ConfigError("mlp_bias: true (biases on the MLP projections) is not supported")
        if self.extra.get("rope_interleave", True) is not True:
            raise ConfigError(
                "rope_interleave: false (rotate-half RoPE) is not supported; the DeepSeek checkpoints rotate "
                "interleaved pairs"
            )

    def _validate_routing(self) -> None:
        family = FAMILIES.get(self.model_type)
        if family is None:
            return  # _validate_family names the model_type
        if self.scoring_func != family.scoring_func:
            hint = " (DeepSeek-V2 routing: model_type deepseek_v2)" if self.scoring_func == "softmax" else ""
            raise ConfigError(
                f"scoring_func {self.scoring_func!r} is not {family.name} routing "
                f"(model_type {self.model_type!r} uses {family.scoring_func!r}){hint}"
            )
        if self.topk_method not in family.topk_methods:
            raise ConfigError(
                f"topk_method {self.topk_method!r} is not supported for model_type {self.model_type!r} "
                f"(supported: {', '.join(family.topk_methods)})"
            )


def _int4_weights(q: dict) -> dict:
    """The one `weights` scheme of an INT4 compressed-tensors config (Kimi-K2-Thinking), validated."""
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ConfigError(f"quantization_config ({INT4_METHOD}) must have exactly one config_groups entry")
    weights = next(iter(groups.values())).get("weights") if isinstance(next(iter(groups.values())), dict) else None
    if not isinstance(weights, dict):
        raise ConfigError(f"quantization_config ({INT4_METHOD}): config_groups has no weights scheme")
    scheme = (weights.get("num_bits"), weights.get("type"), weights.get("strategy"), weights.get("symmetric"))
    if scheme != (4, "int", "group", True):
        raise ConfigError(
            f"quantization_config ({INT4_METHOD}): only symmetric 4-bit int weights with group scales are "
            f"supported (Kimi-K2-Thinking), got num_bits/type/strategy/symmetric = {scheme}"
        )
    gs = weights.get("group_size")
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
        raise ConfigError(f"quantization_config ({INT4_METHOD}): group_size must be a positive integer, got {gs!r}")
    return weights


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not stretched): the one formula."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# Far above any released model (V3: hidden 7168, 61 layers, 256 experts, 129280 tokens, 163840
# positions), low enough that a typo or a hostile config fails at once instead of while allocating.
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "first_k_dense_replace": 1024,
    "moe_layer_freq": 1024,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "q_lora_rank": 1 << 16,
    "kv_lora_rank": 1 << 16,
    "qk_nope_head_dim": 1 << 12,
    "qk_rope_head_dim": 1 << 12,
    "v_head_dim": 1 << 12,
    "n_routed_experts": 1 << 16,
    "n_shared_experts": 1 << 10,
    "num_experts_per_tok": 1 << 16,
    "n_group": 1 << 16,
    "topk_group": 1 << 16,
    "max_position_embeddings": 1 << 24,
    "num_nextn_predict_layers": 64,
}


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_size_bounds(cfg: ModelConfig) -> None:
    for name, limit in SIZE_LIMITS.items():
        value = getattr(cfg, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            raise ConfigError(f"{name} = {value} is over the supported limit of {limit}")


def _check_token_ids_and_flags(cfg: ModelConfig) -> None:
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{name} must be a non-negative integer or null, got {value!r}")
    eos = cfg.eos_token_id
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"eos_token_id must be a non-negative integer, a list of them, or null, got {eos!r}")
    for name in ("tie_word_embeddings", "norm_topk_prob"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")


def _check_rope_numbers(rs: dict) -> None:
    """The YaRN knobs, when present: finite numbers (beta_* and attention_factor also positive)."""
    for key, positive in (
        ("beta_fast", True),
        ("beta_slow", True),
        ("attention_factor", True),
        ("mscale", False),
        ("mscale_all_dim", False),
    ):
        value = rs.get(key)
        if value is None:
            continue
        if not _is_number(value) or (positive and not value > 0) or value < 0:
            kind = "a positive" if positive else "a non-negative"
            raise ConfigError(f"rope_scaling.{key} must be {kind} finite number, got {value!r}")
    omp = rs.get("original_max_position_embeddings")
    if isinstance(omp, int) and omp > SIZE_LIMITS["max_position_embeddings"]:
        raise ConfigError(f"rope_scaling.original_max_position_embeddings = {omp} is over the supported limit")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _from_rope_parameters(rp: Any) -> tuple[float | None, dict | None]:
    """New-style `rope_parameters` -> (rope_theta, old-style rope_scaling or None)."""
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters must be an object, got {rp!r}")
    rp = dict(rp)
    theta = rp.pop("rope_theta", None)
    rope_type = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    if rope_type == "default":
        return theta, None
    return theta, {"type": rope_type, **rp}
