"""A chat's second turn through the server with prefix reuse and chunked prefill on (as `dsv3 serve` runs):
the answer is offline generate's, the shared turn is not prefilled again, and the slots count as free."""

from __future__ import annotations

import httpx
import openai

import dsv3

MODEL = "tiny-test"


def test_second_turn_reuses_the_first(start_server, model, tokenizer):
    server = start_server(max_batch=2, max_len=256, prefix_reuse=True, prefill_chunk=16)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    history = [
        {"role": "system", "content": "You are a helpful assistant who answers every question in detail."},
        {"role": "user", "content": "Tell me about the history of the bicycle, briefly."},
    ]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the tandem?"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    ids = tokenizer.encode_chat(history)
    want = [t for t in dsv3.generate(model, [ids], 12)[0] if t not in model.config.eos_token_ids]
    assert second.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    metrics = dict(
        line.rsplit(" ", 1) for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line[0] != "#"
    )
    # The template renders the earlier turns identically, so most of turn 2's prompt was already cached.
    assert float(metrics["dsv3_prefix_tokens_reused_total"]) >= first.usage.prompt_tokens - 1
    assert float(metrics["dsv3_cache_slots_in_use"]) == 0 and float(metrics["dsv3_cached_prefixes"]) >= 1
