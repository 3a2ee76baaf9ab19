"""Peak RSS of one process: load `small` (bf16) from CKPT, prefill 4096 tokens, decode 16 (dsv3 or transformers).

Usage: python scripts/peak_memory.py dsv3|transformers CKPT [OPTION=VALUE ...]   (docs/benchmarks.md quotes
the figures); dsv3 takes InferenceOptions string fields, e.g. `matmul_dtype=bf16 matvec=mkl`.
"""

import resource
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
which, ckpt = sys.argv[1], sys.argv[2]
options = dict(arg.split("=", 1) for arg in sys.argv[3:])
prompt = [(7 * i) % 1000 + 2 for i in range(4096)]
if which == "dsv3":
    import dsv3
    from dsv3.inference.generate import decode_step, prefill
    from dsv3.model.cache import LatentCache

    m = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16, **options)
    cache = LatentCache(m.config, 1, 4096 + 17, dtype=torch.bfloat16)
    slots = [cache.allocate()]
    prefill(m, cache, slots, [prompt])
    for _ in range(16):
        decode_step(m, cache, slots, [5])
else:
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    m = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        out = m(torch.tensor([prompt]), use_cache=True)
        for _ in range(16):
            out = m(torch.tensor([[5]]), cache=out.cache, use_cache=True)
print(which, " ".join(sys.argv[3:]), "peak RSS MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
