"""Logprobs and scoring through the server: values against `log_softmax` of the offline model's logits,
lm-evaluation-harness's loglikelihood request and its parsing of the reply, chat's logprobs format."""

from __future__ import annotations

import math
from operator import itemgetter

import httpx
import openai
import pytest
import torch

import dsv3
from dsv3.inference.generate import stream as offline_stream
from dsv3.inference.sampling import SamplingParams

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_batch=4, max_queue=8, max_len=160)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline_logprobs(model, tokenizer):
    """offline_logprobs(ids) -> (T, V') log_softmax of the model's logits over the ids the server may sample."""

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        return torch.log_softmax(logits[:, : tokenizer.vocab_size].float(), dim=-1)

    return run


def lm_eval_parse_logprobs(outputs, ctxlens):
    """lm-evaluation-harness 0.4.x `LocalCompletionsAPI.parse_logprobs` (lm_eval/models/openai_completions.py),
    restated: per choice (sorted by index), the sum of token_logprobs[ctxlen:-1] and whether each of those
    equals the largest value of its top_logprobs dict."""
    res = []
    for out in outputs if isinstance(outputs, list) else [outputs]:
        for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens):
            token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs))
            res.append((sum(token_logprobs), is_greedy))
    return res


def test_lm_eval_loglikelihood_request_round_trip(server, tokenizer, offline_logprobs):
    # Two (context, continuation) pairs in one batch, as `lm_eval --model local-completions --batch_size 2`
    # sends them: token ids, context + continuation, max_tokens 1, logprobs 1, echo, temperature 0, seed.
    context = tokenizer.encode("Question: what is the colour of the sky? Answer:")
    lp = offline_logprobs(context)
    greedy = []  # the model's own continuation: is_greedy must come back True
    for _ in range(3):
        greedy.append(int(lp[-1].argmax()))
        lp = offline_logprobs(context + greedy)
    other = [t + 1 for t in greedy]  # not the argmax: is_greedy False
    requests = [context + greedy, context + other]
    payload = {
        "model": MODEL,
        "prompt": requests,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    r = httpx.post(f"{server.url}/v1/completions", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    reply = r.json()
    got = lm_eval_parse_logprobs(reply, [len(context), len(context)])

    for (total, is_greedy), ids, want_greedy in zip(got, requests, (True, False)):
        lp = offline_logprobs(ids)
        want = sum(float(lp[t - 1, ids[t]]) for t in range(len(context), len(ids)))
        assert total == pytest.approx(want, abs=1e-3) and is_greedy is want_greedy
    for choice, ids in zip(sorted(reply["choices"], key=itemgetter("index")), requests):
        lp = offline_logprobs(ids)
        logprobs = choice["logprobs"]
        # One entry per prompt token and one for the generated token; nothing predicts the first token.
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(ids) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        want = [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))] + [float(lp[-1].max())]
        assert logprobs["token_logprobs"][1:] == pytest.approx(want, abs=1e-3)
        assert [len(top) for top in logprobs["top_logprobs"][1:]] == [1] * len(ids)
        assert logprobs["tokens"][: len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
        assert choice["text"].startswith(tokenizer.decode(ids, skip_special_tokens=True))
    assert reply["usage"]["prompt_tokens"] == 2 * len(requests[0]) and reply["usage"]["completion_tokens"] == 2


def test_max_tokens_0_with_echo_scores_without_generating(server, client, tokenizer, offline_logprobs):
    prompt = "Scoring only: no token is generated."
    ids = tokenizer.encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0, temperature=0)
    choice = r.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = offline_logprobs(ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-3
    )
    assert all(top == {} for top in choice.logprobs.top_logprobs[1:])  # logprobs 0: no alternatives
    # Streamed: the echo chunk carries the same logprobs.
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == prompt
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == choice.logprobs.token_logprobs


def test_generated_token_logprobs_match_the_model(model, client, tokenizer, offline_logprobs):
    prompt = "Logprobs of sampled tokens"
    ids = tokenizer.encode(prompt)
    # Sampled at temperature 0.8: logprobs are of the model's distribution, not the tempered one. The
    # tokens are those offline sampling draws with the same seed (ignore_eos: no stop id).
    args = dict(
        model=MODEL, prompt=prompt, max_tokens=6, logprobs=3, temperature=0.8, seed=7, extra_body={"ignore_eos": True}
    )
    r = client.completions.create(**args)
    lp_obj = r.choices[0].logprobs
    params = SamplingParams(temperature=0.8)
    with torch.inference_mode():
        steps = offline_stream(model, [ids], 6, params, seed=7, stop_token_ids=[], vocab_limit=tokenizer.vocab_size)
        generated = [t for step in steps for t in step.values()]
    assert lp_obj.tokens == [tokenizer.decode([t]) for t in generated] and r.usage.completion_tokens == 6
    lp = offline_logprobs(ids + generated)
    want = [float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(generated)]
    assert lp_obj.token_logprobs == pytest.approx(want, abs=1e-3)
    for i, top in enumerate(lp_obj.top_logprobs):
        values, best = torch.topk(lp[len(ids) - 1 + i], 3)
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-3)
        assert set(top) == {tokenizer.decode([t]) for t in best.tolist()}
    assert lp_obj.text_offset[0] == 0 and "".join(lp_obj.tokens).startswith(r.choices[0].text[:1])

    streamed = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    got = [x for c in streamed if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert got == pytest.approx(lp_obj.token_logprobs, abs=1e-6)


def test_chat_logprobs_content_format(model, client, tokenizer, offline_logprobs):
    messages = [{"role": "user", "content": "Give me logprobs."}]
    ids = tokenizer.encode_chat(messages)
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    generated = [t for t in dsv3.generate(model, [ids], 5)[0] if t not in model.config.eos_token_ids]
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in generated]
    lp = offline_logprobs(ids + generated)
    assert [c.logprob for c in content] == pytest.approx(
        [float(lp[len(ids) - 1 + i].max()) for i in range(len(content))], abs=1e-3
    )  # greedy: each token is the argmax
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.bytes == list(c.token.encode())
    assert "".join(c.token for c in content).startswith(r.choices[0].message.content[:1])

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
    )
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    # Without logprobs the field is null.
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None and math.isfinite(content[0].logprob)
