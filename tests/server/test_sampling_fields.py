"""Every field of OpenAI's request schemas is honoured or refused with a 400 naming it; the sampling
extensions (logit_bias, penalties, min_p, min_tokens, ignore_eos, n, prompt batches) do what they say."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

import dsv3
from dsv3.inference.engine import Engine
from dsv3.inference.sampling import LogitsProcessor, SamplingParams, filtered_probs

MODEL = "tiny-test"
USER = [{"role": "user", "content": "Hello"}]

# field -> (a value other than the default, whether dsv3 honours it). "stream" is not in the base
# TypedDicts (the SDK splits streaming and non-streaming params), so it is listed by hand.
COMPLETION_FIELDS = {
    "model": (MODEL, True),
    "prompt": ("Hi there", True),
    "best_of": (3, False),
    "echo": (True, True),
    "frequency_penalty": (0.5, True),
    "logit_bias": ({"100": 5}, True),
    "logprobs": (2, True),
    "max_tokens": (3, True),
    "n": (2, True),
    "presence_penalty": (0.5, True),
    "seed": (3, True),
    "stop": (["x"], True),
    "stream": (True, True),
    "stream_options": ({"include_usage": True}, True),
    "suffix": ("!", False),
    "temperature": (0.5, True),
    "top_p": (0.9, True),
    "user": ("user-1", True),
}
CHAT_FIELDS = {
    "model": (MODEL, True),
    "messages": ([{"role": "developer", "content": "Be brief."}, *USER], True),
    "audio": ({"voice": "alloy", "format": "wav"}, False),
    "frequency_penalty": (0.5, True),
    "function_call": ("auto", False),
    "functions": ([{"name": "f", "parameters": {"type": "object"}}], False),
    "logit_bias": ({"100": 5}, True),
    "logprobs": (True, True),
    "max_completion_tokens": (3, True),
    "max_tokens": (3, True),
    "metadata": ({"k": "v"}, True),
    "modalities": (["text", "audio"], False),
    "moderation": ({"model": "omni-moderation-latest"}, False),
    "n": (2, True),
    "parallel_tool_calls": (False, False),
    "prediction": ({"type": "content", "content": "x"}, False),
    "presence_penalty": (0.5, True),
    "prompt_cache_key": ("conversation-1", True),
    "prompt_cache_options": ({"mode": "implicit", "ttl": "30m"}, True),
    "prompt_cache_retention": ("24h", True),
    "reasoning_effort": ("low", False),
    "response_format": ({"type": "json_object"}, True),
    "safety_identifier": ("user-hash", True),
    "seed": (3, True),
    "service_tier": ("flex", False),
    "stop": (["x"], True),
    "store": (True, False),
    "stream": (True, True),
    "stream_options": ({"include_usage": True}, True),
    "temperature": (0.5, True),
    "tool_choice": ("required", True),
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], True),
    "top_logprobs": (2, True),
    "top_p": (0.9, True),
    "user": ("user-1", True),
    "verbosity": ("low", False),
    "web_search_options": ({}, False),
}
COMPANIONS = {
    "top_logprobs": {"logprobs": True},
    "tool_choice": {"tools": CHAT_FIELDS["tools"][0]},
    # false is honoured when a call is forced or no tool can be called (test_structured.py); refused with tool_choice auto
    "parallel_tool_calls": {"tools": CHAT_FIELDS["tools"][0]},
}


def sdk_fields(typed_dict) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__) | {"stream"}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_batch=8, max_queue=8, max_len=160)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_every_openai_request_field_is_honoured_or_refused(server):
    # A field the installed SDK knows but this table does not fails here: classify it (and serve or refuse it).
    assert sdk_fields(completion_create_params.CompletionCreateParamsBase) == set(COMPLETION_FIELDS)
    assert sdk_fields(chat_create_params.CompletionCreateParamsBase) == set(CHAT_FIELDS)
    http = httpx.Client(base_url=server.url, timeout=120)
    for path, fields, base in (
        ("/v1/completions", COMPLETION_FIELDS, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
        ("/v1/chat/completions", CHAT_FIELDS, {"model": MODEL, "messages": USER, "max_tokens": 2}),
    ):
        for field, (value, honoured) in fields.items():
            body = {**base, **COMPANIONS.get(field, {}), field: value}
            if field == "stream_options":
                body["stream"] = True
            r = http.post(path, json=body)
            if honoured:
                assert r.status_code == 200, (path, field, r.text)
            else:
                assert r.status_code == 400, (path, field, r.text)
                error = r.json()["error"]
                assert error["param"] == field and error["code"] == "unsupported", (field, error)


def test_logit_bias_steers_greedy_choice(client, tokenizer):
    target = tokenizer.encode(" banana", add_bos=False)[0]
    r = client.completions.create(
        model=MODEL, prompt="Fruit:", max_tokens=4, temperature=0, logit_bias={str(target): 100}
    )
    assert r.choices[0].text == tokenizer.decode([target] * 4)
    banned = client.completions.create(model=MODEL, prompt="Fruit:", max_tokens=4, temperature=0)
    first = tokenizer.encode(banned.choices[0].text, add_bos=False)[0]
    again = client.completions.create(
        model=MODEL, prompt="Fruit:", max_tokens=4, temperature=0, logit_bias={str(first): -100}
    )
    assert not again.choices[0].text.startswith(tokenizer.decode([first]))


def test_n_and_prompt_batches_give_indexed_choices(client, tokenizer):
    prompts = ["First prompt", "Second, longer prompt here"]
    singles = {
        (p, s): client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=1.0, seed=s).choices[0].text
        for p in prompts
        for s in (11, 12)
    }
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # choice index = prompt index * n + i, sampled with seed + i
    assert [c.text for c in r.choices] == [singles[(p, s)] for p in prompts for s in (11, 12)]
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 20

    chunks = list(
        client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=1.0, seed=11, stream=True)
    )
    texts = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[k] for k in range(4)] == [c.text for c in r.choices]

    chat = client.chat.completions.create(model=MODEL, messages=USER, n=3, max_tokens=4, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) > 1  # different seeds, different samples


def test_developer_role_is_the_system_prompt(client):
    as_system = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=6, temperature=0
    )
    as_developer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be brief."}, *USER], max_tokens=6, temperature=0
    )
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


def test_chat_default_max_tokens_is_the_rest_of_the_context(client, tokenizer):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, extra_body={"ignore_eos": True}
    )  # max_len 160: the answer fills the context
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 160 and r.choices[0].finish_reason == "length"


# --- the processor and filters on their own ----------------------------------------------------------------------------


def test_penalties_follow_vllm_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias=((4, 1.5),)
    )
    proc = LogitsProcessor(params, prompt=[1], stop_ids=[])
    got = proc(logits, [3, 3, 0])
    # repetition: ids 1 (prompt), 3 and 0 (output): positive / 2, negative * 2; then output counts 0:1, 3:2.
    want = torch.tensor([2.0 / 2 - 0.25 - 0.5, -1.0 * 2, 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0 + 1.5])
    assert torch.allclose(got, want)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))  # the input row is not edited

    min_tokens = LogitsProcessor(SamplingParams(min_tokens=2), prompt=[0], stop_ids=[3])
    assert min_tokens(logits, [0])[3] == float("-inf") and min_tokens(logits, [0, 1])[3] == 3.0


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.2))  # keeps p >= 0.1
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert torch.allclose(filtered_probs(logits, SamplingParams(temperature=1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_min_tokens_and_ignore_eos_in_the_engine():
    torch.manual_seed(1)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny"), dtype=torch.float32).eval()
    p = [0, 5, 9, 14]
    greedy = dsv3.generate(model, [p], max_new_tokens=6, stop_token_ids=[])[0]
    stop = greedy[0]  # the first greedy token, made a stop id
    with Engine(model, max_batch=2, max_len=64) as eng:
        plain = eng.submit(p, max_new_tokens=6, stop_token_ids=[stop]).result()
        held = eng.submit(p, SamplingParams(min_tokens=3), max_new_tokens=6, stop_token_ids=[stop]).result()
        ignored = eng.submit(p, max_new_tokens=6, stop_token_ids=[]).result()
    assert plain == [stop]
    assert stop not in held[:3] and len(held) >= 3
    assert ignored == greedy
