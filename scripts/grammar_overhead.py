#!/usr/bin/env python
"""Per-token mask overhead of xgrammar / llguidance / outlines-core on CPU with the DeepSeek-V3 tokenizer.

Walks a 46-token JSON document through each library's matcher for one JSON schema, timing per token the
mask computation alone and mask + apply to a (1, V) logits row + accept; plus tokenizer setup and
schema compile. Only llguidance is a dsv3 dependency; install the others to compare (xgrammar can be
installed with `pip install --no-deps --target DIR xgrammar apache-tvm-ffi` and DIR put on PYTHONPATH):

    python scripts/grammar_overhead.py llguidance xgrammar outlines
"""

import json
import statistics
import sys
import time

import torch
import transformers

from dsv3.tokenizer import Tokenizer

tok = Tokenizer.from_dir(None)
V = 129280  # the model's padded vocabulary (the tokenizer has 128,815 ids)
hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tok, eos_token="<｜end▁of▁sentence｜>")
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
doc = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "tags": ["math", "poetry", "engines"],
        "address": {"city": "London", "zip": "W1"},
    }
)
ids = tok.encode(doc, add_bos=False)
print(f"tokenizer ids {tok.vocab_size}, document {len(ids)} tokens", flush=True)
base = []
for _ in range(46):
    s0 = time.perf_counter()
    l = torch.randn(1, V).clone()
    l.masked_fill_(l > 3, float("-inf"))
    base.append(time.perf_counter() - s0)
print(f"baseline clone+masked_fill of one (1, V) row: median {statistics.median(base) * 1e6:.0f} us")
logits = torch.randn(1, V)


def report(name, compile_s, steps, fills=None):
    if fills:
        f = sorted(fills)
        print(
            f"{name}: mask fill alone median {statistics.median(f) * 1e6:.0f} us, max {f[-1] * 1e6:.0f} us (first {fills[0] * 1e6:.0f} us)"
        )
    steps = sorted(steps)
    print(
        f"{name}: compile {compile_s * 1e3:.0f} ms; per token mask+apply+accept median {statistics.median(steps) * 1e6:.0f} us, p90 {steps[int(0.9 * len(steps))] * 1e6:.0f} us, max {steps[-1] * 1e6:.0f} us",
        flush=True,
    )


which = sys.argv[1:] or ["llguidance", "xgrammar", "outlines"]
if "llguidance" in which:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    info = llguidance.hf.from_tokenizer(hf, n_vocab=V)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    m = llguidance.LLMatcher(info, grammar)
    t2 = time.perf_counter()
    bitmask = llguidance.torch.allocate_token_bitmask(1, V)
    steps, fills = [], []
    for t in ids:
        s = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)
        fills.append(time.perf_counter() - s)
        l = logits.clone()
        llguidance.torch.apply_token_bitmask_inplace(l, bitmask)
        assert m.consume_token(t), (t, m.get_error())
        steps.append(time.perf_counter() - s)
    print(f"llguidance tokenizer setup {1e3 * (t1 - t0):.0f} ms")
    report("llguidance", t2 - t1, steps, fills)
if "xgrammar" in which:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema))
    t2 = time.perf_counter()
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, V)
    steps, fills = [], []
    for t in ids:
        s = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        fills.append(time.perf_counter() - s)
        l = logits.clone()
        xgr.apply_token_bitmask_inplace(l, bitmask)
        assert m.accept_token(t), t
        steps.append(time.perf_counter() - s)
    print(f"xgrammar tokenizer setup {1e3 * (t1 - t0):.0f} ms")
    report("xgrammar", t2 - t1, steps, fills)
if "outlines" in which:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core import json_schema as ocjs

    t0 = time.perf_counter()
    vocab = {}
    for token, i in hf.get_vocab().items():
        if i == 1:
            continue
        s = hf.convert_tokens_to_string([token])
        vocab.setdefault(s, []).append(i)
    vocab.pop("", None)
    voc = Vocabulary(1, vocab)
    t1 = time.perf_counter()
    regex = ocjs.build_regex_from_schema(json.dumps(schema))
    index = Index(regex, voc)
    t2 = time.perf_counter()
    g = Guide(index)
    steps, fills = [], []
    for t in ids:
        s = time.perf_counter()
        allowed = g.get_tokens()
        mask = torch.full((1, V), float("-inf"))
        mask[0, torch.tensor(allowed)] = 0
        l = logits + mask
        g.advance(t)
        steps.append(time.perf_counter() - s)
    print(f"outlines-core vocabulary {1e3 * (t1 - t0):.0f} ms")
    report("outlines-core", t2 - t1, steps)
