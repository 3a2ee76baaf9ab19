"""The MTP module against an independent reference.

Reference: the MTP block is one MoE decoder layer; transformers' model with a single MoE layer, its
final norm = shared_head.norm and lm_head = shared_head.head, computes the same thing when fed
inputs_embeds = eh_proj(cat[enorm(embed(t+1)), hnorm(h_t)]), which the test builds by hand.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv3

pytest.importorskip("transformers")


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_logits_match_a_transformers_decoder_layer(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg = dsv3.ModelConfig.from_pretrained("tiny")
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.mul_(4)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "ours")

    # Re-label layer L's block as layer 0 of a 1-layer, all-MoE transformers model.
    L = cfg.num_hidden_layers
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    out, glue = {}, {}
    for shard in set(index["weight_map"].values()):
        with safe_open(tmp_path / "ours" / shard, "pt") as f:
            for k in f.keys():
                prefix = f"model.layers.{L}."
                if not k.startswith(prefix):
                    continue
                rest = k[len(prefix) :]
                t = f.get_tensor(k)
                if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight"):
                    glue[rest] = t
                    if rest == "embed_tokens.weight":
                        out["model.embed_tokens.weight"] = t
                elif rest == "shared_head.norm.weight":
                    out["model.norm.weight"] = t
                elif rest == "shared_head.head.weight":
                    out["lm_head.weight"] = t
                else:
                    out["model.layers.0." + rest] = t
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file(out, ref_dir / "model.safetensors")
    ref_cfg = {**cfg.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0}
    ref_cfg.pop("extra", None)
    (ref_dir / "config.json").write_text(json.dumps(ref_cfg))
    ref = DeepseekV3ForCausalLM.from_pretrained(ref_dir, attn_implementation="eager", dtype=torch.float32).eval()

    ids = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        h = model.hidden_states(ids[:, :-1])  # main model at positions 0..12
        got, _ = model.mtp_logits(h, ids[:, 1:])  # predicts tokens 2..14 from (h_t, token t+1)
        e = rms(glue["embed_tokens.weight"][ids[:, 1:]], glue["enorm.weight"])
        x = torch.cat([e, rms(h, glue["hnorm.weight"])], dim=-1) @ glue["eh_proj.weight"].T
        want = ref(inputs_embeds=x).logits.float()
        # Order matters: hnorm/enorm swapped must give something else.
        x_swapped = torch.cat([rms(h, glue["hnorm.weight"]), e], dim=-1) @ glue["eh_proj.weight"].T
        wrong = ref(inputs_embeds=x_swapped).logits.float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    assert ((wrong - want).abs().max() / want.abs().max()).item() > 1e-2
    # A draft needs one position per row: logits_at gives exactly those rows of the full logits.
    with torch.no_grad():
        picked, hidden = model.mtp_logits(h, ids[:, 1:], logits_at=[12, 5])
    assert picked.shape == (2, cfg.vocab_size) and hidden.shape == h.shape
    torch.testing.assert_close(picked, torch.stack([got[0, 12], got[1, 5]]), rtol=1e-5, atol=1e-5)
