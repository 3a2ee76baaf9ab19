"""Config values are checked for type, finiteness and bounds before anything is built or allocated."""

from __future__ import annotations

import json
import math
import time

import pytest

from dsv3.cli import main
from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.presets import PRESETS


def tiny(**changes):
    d = json.loads(json.dumps(PRESETS["tiny"]))
    for key, value in changes.items():
        if key.startswith("rope_scaling."):
            d["rope_scaling"][key.split(".", 1)[1]] = value
        else:
            d[key] = value
    return d


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"rope_theta": 1}, "rope_theta"),
        ({"rope_theta": 0.5}, "rope_theta"),
        ({"rope_scaling.beta_fast": "abc"}, "beta_fast"),
        ({"rope_scaling.beta_slow": math.nan}, "beta_slow"),
        ({"rope_scaling.beta_fast": 0}, "beta_fast"),
        ({"rope_scaling.mscale": "1"}, "mscale"),
        ({"rope_scaling.mscale_all_dim": "x"}, "mscale_all_dim"),
        ({"rope_scaling.mscale_all_dim": math.inf}, "mscale_all_dim"),
        ({"rope_scaling.factor": math.nan}, "factor"),
        ({"rope_scaling.factor": math.inf}, "factor"),
        ({"rope_scaling.attention_factor": "big"}, "attention_factor"),
        ({"hidden_size": 1e12}, "hidden_size"),
        ({"hidden_size": 10**12}, "hidden_size"),
        ({"n_routed_experts": 2**40, "n_group": 1, "topk_group": 1}, "n_routed_experts"),
        ({"num_hidden_layers": 20000}, "num_hidden_layers"),
        ({"vocab_size": 2**40}, "vocab_size"),
        ({"intermediate_size": 2**40}, "intermediate_size"),
        ({"max_position_embeddings": 2**40}, "max_position_embeddings"),
        ({"num_attention_heads": 10**9}, "num_attention_heads"),
        ({"eos_token_id": "</s>"}, "eos_token_id"),
        ({"eos_token_id": [1, "x"]}, "eos_token_id"),
        ({"bos_token_id": 1.5}, "bos_token_id"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ],
)
def test_bad_values_fail_fast_naming_the_field(changes, field):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(tiny(**changes))
    assert time.perf_counter() - t0 < 5.0  # validation only: nothing is built or allocated


def test_released_configs_still_validate():
    for name in PRESETS:
        ModelConfig.from_pretrained(name)
    ModelConfig.from_dict(tiny(eos_token_id=[1, 2], bos_token_id=None, pad_token_id=None))


@pytest.mark.parametrize(
    "changes", [{"rope_theta": 1}, {"rope_scaling.beta_fast": "abc"}, {"rope_scaling.factor": math.nan}]
)
def test_cli_gives_one_line_not_a_traceback(tmp_path, capsys, changes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny(**changes)))
    assert main(["init", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
