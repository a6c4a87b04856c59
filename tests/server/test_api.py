"""The real server in a subprocess, driven by the official openai SDK and raw HTTP."""

import json
import math

import httpx
import openai
import pytest
import torch
from trieserve.server.pieces import byte_decoder

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STATS_KEYS = {
    "forward_passes",
    "draft_tokens",
    "accepted_tokens",
    "tokens_per_forward",
    "kv_tokens_kept",
    "kv_tokens_total",
    "kv_evictions",
    "cached_prompt_tokens",
    "prefill_s",
    "decode_s",
}


def test_health_models_metrics(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ids = [m.id for m in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct"]
    card = client.models.retrieve(ids[0])
    assert card.id == ids[0] and card.owned_by == "trieserve"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/models/").json()["data"][0]["id"] == ids[0]
    client.completions.create(model=ids[0], prompt="Hello", max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "trieserve_requests_total",
        "trieserve_generation_tokens_total",
        "trieserve_time_to_first_token_seconds_bucket",
        "trieserve_time_per_output_token_seconds_bucket",
        "trieserve_e2e_request_latency_seconds_count",
        "trieserve_queue_length",
        "trieserve_forward_passes_total",
    ):
        assert name in text
    done = [
        ln
        for ln in text.splitlines()
        if ln.startswith('trieserve_requests_total{endpoint="/v1/completions",status="200"}')
    ]
    assert done and float(done[0].split()[-1]) >= 1


def test_chat_non_streaming_is_coherent(client):
    resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, temperature=0, max_tokens=40)
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.object == "chat.completion" and resp.id and resp.created
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 10
    stats = resp.model_extra["stats"]
    assert STATS_KEYS <= set(stats)
    assert stats["forward_passes"] >= 1 and stats["kv_tokens_total"] == resp.usage.prompt_tokens


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(model="SmolLM2-135M-Instruct", messages=CHAT, temperature=0, max_tokens=30)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.id == chunks[0].id and c.model == "SmolLM2-135M-Instruct" for c in chunks)


def test_completions_streaming_and_max_tokens(client):
    resp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=12, temperature=0
    )
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 12
    stream = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == resp.choices[0].text


def test_completion_greedy_equals_hf_generate(client, hf_model, tokenizer):
    prompt = "The three primary colors are"
    ids = tokenizer(prompt)["input_ids"]
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :]
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=20, temperature=0)
    assert resp.choices[0].text == tokenizer.decode(ref, skip_special_tokens=True)


def test_stop_string_truncates(client):
    base = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = base.choices[0].text
    assert " 7" in text, text
    cut = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"]
    )
    assert cut.choices[0].text == text[: text.index(" 7")]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(
        model="SmolLM2-135M-Instruct", prompt="My favourite animal is", max_tokens=16, temperature=1.0, top_p=0.9
    )
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    assert a == b


def test_unknown_fields_are_ignored(server):
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0, "frobnicate": 3}
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            400,
            "temperature",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "kv_policy": "magic"},
            400,
            "kv_policy",
        ),
        ("/v1/completions", {"prompt": "hi", "kv_budget": 0}, 400, "kv_budget"),
        ("/v1/completions", {"prompt": "hi", "kv_budget": "half"}, 400, "kv_budget"),
        ("/v1/completions", {"prompt": "hi", "kv_regrow": 8}, 400, "kv_regrow"),
        ("/v1/completions", {"prompt": "hi", "kv_regrow": -1}, 400, "kv_regrow"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "word " * 9000}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
        # text JSON can carry that is not text: a lone surrogate
        ("/v1/completions", {"prompt": "abc\ud800", "max_tokens": 2}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfff"}]}, 400, "messages.0.content"),
        # a field taking several types is named as the client wrote it, not by pydantic's union member
        ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
        ("/v1/completions", {"prompt": [1.5, 2]}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        # OpenAI fields that would change the answer and are not implemented: a 400, not ignored
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "kv_policy": "snapkv"}, 400, "echo"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"fifty": -100}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"5_0": -100}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"50": -100, "050": 3}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"10000000": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"50": 101}}, 400, "logit_bias.50"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
        ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
        ("/v1/completions", {"prompt": "hi", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens"),
        ("/v1/completions", {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
        ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "object"}}, 400, "guided_json"),
        ("/v1/completions", {"prompt": "hi", "stop": ["ok", "\ud800"]}, 400, "stop"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
            400,
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            400,
            "tools",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
            400,
            "response_format",
        ),
    ],
)
def test_bad_input_gets_openai_shaped_4xx(server, path, body, status, param):
    # json.dumps escapes non-ASCII (a lone surrogate too, which httpx's own encoder refuses)
    r = httpx.post(
        server.url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_null_means_the_default(server):
    body = {"prompt": "Hi", "temperature": None, "top_p": None, "n": None, "stream": None, "seed": None}
    body |= {"presence_penalty": None, "frequency_penalty": None, "stop": None, "lookahead": None}
    r = httpx.post(server.url + "/v1/completions", json=body | {"max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    # max_tokens null on completions is OpenAI's default of 16, not the rest of the context
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "Count: 1, 2, 3,", "max_tokens": None, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
    # a response_format of plain text changes nothing and is accepted
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 2, "response_format": {"type": "text"}, "stream_options": None}
        | {"tools": [], "tool_choice": "none", "logprobs": False, "top_logprobs": None, "best_of": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_null_inside_stream_options_is_the_default(client, server):
    body = {"prompt": "Hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": None}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert not any('"usage"' in ln for ln in lines)  # include_usage defaults to off


def test_union_field_errors_name_the_accepted_types(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "stop": 5}, timeout=60)
    assert r.status_code == 400
    assert "str or list[str]" in r.json()["error"]["message"]


def test_malformed_json_gets_400(server):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_json_body_sent_with_another_content_type_gets_a_400_that_says_so(server):
    body = b'{"prompt": "Hi", "max_tokens": 2}'
    r = httpx.post(
        server.url + "/v1/completions", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )  # what `curl -d` sends without -H
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "Content-Type: application/json" in message and "application/x-www-form-urlencoded" in message


def test_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[], max_tokens=5)


def _reference_logprobs(hf_model, prompt_ids, output_ids):
    """Log-softmax of one teacher-forced HF forward over prompt + output: row i of the result
    is the distribution output token i was chosen from."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1)


REPEAT = "Repeat exactly: the cat sat on the mat, the cat sat on the mat."
JAPANESE = "Translate to Japanese: good morning"  # its greedy answer splits characters over tokens


def _token_id(tokenizer, entry) -> int:
    """The token whose vocabulary piece is `entry.bytes` (byte-level BPE), or a special token."""
    if entry.token in tokenizer.all_special_tokens:
        return tokenizer.convert_tokens_to_ids(entry.token)
    to_char = {b: c for c, b in byte_decoder().items()}
    token_id = tokenizer.convert_tokens_to_ids("".join(to_char[b] for b in entry.bytes))
    assert token_id is not None and token_id != tokenizer.unk_token_id, entry
    return token_id


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("content", [REPEAT, JAPANESE])
def test_chat_logprobs_match_the_model(client, tokenizer, hf_model, lookahead, content):
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=24,
        logprobs=True,
        top_logprobs=3,
        extra_body={"lookahead": lookahead, "ignore_eos": True},
    )
    choice = resp.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 24
    special = set(tokenizer.all_special_tokens)  # the chat template's end marker, shown as in vLLM
    text = b"".join(bytes(e.bytes) for e in entries if e.token not in special)
    assert text.decode("utf-8") == choice.message.content  # the bytes rebuild split characters
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    output_ids = [_token_id(tokenizer, e) for e in entries]  # each entry's bytes name its token
    if content == JAPANESE:
        assert any("\ufffd" in e.token for e in entries)  # characters split over tokens
    ref = _reference_logprobs(hf_model, prompt_ids, output_ids)
    for i, e in enumerate(entries):
        assert e.logprob <= 0
        assert e.logprob == pytest.approx(float(ref[i, output_ids[i]]), abs=2e-3)
        top = [t.logprob for t in e.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert top[0] == pytest.approx(float(ref[i].max()), abs=2e-3)
    if lookahead and content == REPEAT:
        assert resp.model_extra["stats"]["forward_passes"] < 24  # the tokens came in multi-token steps


def test_completion_logprobs_streamed_and_not(client):
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="def add(a, b):\n    return", max_tokens=10, temperature=0)
    full = client.completions.create(logprobs=2, **kwargs).choices[0]
    lp = full.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == full.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 2 <= len(top) <= 3 and top[tok] == pytest.approx(chosen)
        assert max(top.values()) == pytest.approx(chosen)  # greedy
    streamed = list(client.completions.create(logprobs=2, stream=True, **kwargs))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in streamed if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    offsets = [v for c in streamed if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert values == pytest.approx(lp.token_logprobs, abs=1e-4)
    # logprobs: 0 gives the chosen token's logprob only; without the field there are none
    zero = client.completions.create(logprobs=0, **kwargs).choices[0].logprobs
    assert zero.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert all(list(top) == [tok] for tok, top in zip(zero.tokens, zero.top_logprobs, strict=True))
    assert client.completions.create(**kwargs).choices[0].logprobs is None


def test_chat_stream_logprobs_cover_every_token(client):
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=CHAT,
            temperature=0.8,
            seed=3,
            max_tokens=20,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in entries)


def test_echo_returns_the_prompt_and_its_logprobs(client, tokenizer, hf_model):
    # longer than one prefill chunk (512 tokens), so the prompt's rows come from several forwards
    prompt = "The quick brown fox jumps over the lazy dog. " * 70
    prompt_ids = tokenizer.encode(prompt)
    assert len(prompt_ids) > 600
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=3, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    echoed = client.completions.create(echo=True, **kwargs).choices[0]
    assert echoed.text == prompt + plain and echoed.logprobs is None
    lp = client.completions.create(echo=True, logprobs=1, **kwargs).choices[0].logprobs
    n = len(prompt_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n + 3
    assert "".join(lp.tokens) == prompt + plain
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n + 3)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = _reference_logprobs(hf_model, prompt_ids[:1], prompt_ids[1:])  # row i: prompt token i + 1
    got = torch.tensor(lp.token_logprobs[1:n])
    want = ref[torch.arange(n - 1), torch.tensor(prompt_ids[1:])]
    assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()
    for i in range(1, n):  # the prompt token itself is among the top entries, with the best one
        top = lp.top_logprobs[i]
        assert top[lp.tokens[i]] == pytest.approx(lp.token_logprobs[i]) and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(float(ref[i - 1].max()), abs=2e-3)
    # streamed: the prompt comes first, in a chunk of its own, then the completion
    chunks = list(client.completions.create(echo=True, logprobs=1, stream=True, **kwargs))
    assert chunks[0].choices[0].text == prompt
    assert chunks[0].choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n], abs=1e-4)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt + plain
    chunks = list(client.completions.create(echo=True, stream=True, **kwargs))  # no logprobs: at once
    assert chunks[0].choices[0].text == prompt and chunks[0].choices[0].logprobs is None
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt + plain
    # max_tokens 0 with echo scores the prompt alone (as OpenAI's legacy completions did)
    score = client.completions.create(**{**kwargs, "max_tokens": 0}, echo=True, logprobs=0)
    assert score.choices[0].text == prompt and score.choices[0].finish_reason == "length"
    assert score.usage.completion_tokens == 0 and score.choices[0].logprobs.tokens == lp.tokens[:n]
    assert score.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n], abs=1e-4)
    # token ids in, the decoded prompt echoed
    ids = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt_ids[:20], max_tokens=2, temperature=0, echo=True
    )
    assert ids.choices[0].text.startswith(tokenizer.decode(prompt_ids[:20]))


def test_completion_offsets_follow_the_text_through_split_characters(client, tokenizer):
    prompt = "Hi 😀 there, 日本語のテキスト: naïve café ☕ and"
    ids = tokenizer.encode(prompt)
    resp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    n = len(ids)
    assert choice.text.startswith(prompt) and len(lp.text_offset) == n + 6
    for k in range(n):  # each prompt token starts where the text decoded before it ends
        before = tokenizer.decode(ids[:k])
        assert lp.text_offset[k] == len(before) - before.endswith("\ufffd"), k
    assert any("\ufffd" in t for t in lp.tokens[:n])  # the emoji is split over tokens
    # the completion's offsets count from the end of the echoed prompt, in its own text
    completion = choice.text[len(prompt) :]
    assert lp.text_offset[n] == len(prompt)
    for k, off in enumerate(lp.text_offset[n:]):
        token = lp.tokens[n + k]
        if "\ufffd" not in token and token not in tokenizer.all_special_tokens:
            assert completion[off - len(prompt) :].startswith(token)
    # alternatives that read the same (split characters) do not hide the chosen token's value
    for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert tok in top and top[tok] >= value - 1e-6


def test_the_context_bounds_prompt_plus_max_tokens(client, server):
    context = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    assert context == 8192  # SmolLM2's
    word = 1000
    kwargs = dict(model="SmolLM2-135M-Instruct", temperature=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(prompt=[word] * (context + 1), max_tokens=1, echo=True, **kwargs)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(prompt=[word] * context, max_tokens=1, **kwargs)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(prompt=[word] * (context - 4), max_tokens=5, **kwargs)
    # a prompt that fills the context can still be scored: echo with max_tokens 0
    scored = client.completions.create(prompt=[word] * context, max_tokens=0, echo=True, **kwargs)
    assert scored.usage.prompt_tokens == context and scored.usage.completion_tokens == 0


@pytest.mark.parametrize("lookahead", [False, True])
def test_logit_bias_min_p_and_stop_token_ids_steer_the_output(client, tokenizer, lookahead):
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="def add(a, b):\n    return a + b\n\ndef sub(a, b):\n")
    kwargs |= dict(max_tokens=12, temperature=0, extra_body={"lookahead": lookahead, "ignore_eos": True})
    plain = client.completions.create(logprobs=0, **kwargs).choices[0]
    ids = tokenizer.encode(plain.text, add_special_tokens=False)
    # +100 on one token: greedy picks it at every step
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    biased = client.completions.create(**{**kwargs, "logit_bias": {str(forced): 100}}).choices[0]
    assert tokenizer.encode(biased.text, add_special_tokens=False) == [forced] * 12
    # -100 on the first greedy token: the answer starts with another
    first = tokenizer.encode(plain.logprobs.tokens[0], add_special_tokens=False)
    banned = client.completions.create(**{**kwargs, "logit_bias": {str(first[0]): -100}}).choices[0]
    assert banned.text and not banned.text.startswith(plain.logprobs.tokens[0])
    # min_p 1 keeps only the most likely token: sampling at temperature 1 is greedy
    extra = kwargs["extra_body"]
    sampled = client.completions.create(
        **{**kwargs, "temperature": 1.0, "seed": 5, "extra_body": {**extra, "min_p": 1.0}}
    ).choices[0]
    assert sampled.text == plain.text
    # a stop token id ends the sequence where it is generated, even with ignore_eos; its text is not sent
    stop_at = plain.logprobs.tokens.index(next(t for t in plain.logprobs.tokens[2:] if t.strip()))
    stop_id = tokenizer.encode(plain.logprobs.tokens[stop_at], add_special_tokens=False)[0]
    stopped = client.completions.create(**{**kwargs, "extra_body": {**extra, "stop_token_ids": [stop_id]}})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == stop_at + 1
    assert stopped.choices[0].text == "".join(plain.logprobs.tokens[:stop_at])
    assert ids  # the plain answer is not empty


@pytest.mark.parametrize("lookahead", [False, True])
def test_a_shared_prefix_is_served_from_the_prefix_cache(client, server, tokenizer, hf_model, lookahead):
    doc = (
        f"Notes ({'with' if lookahead else 'without'} drafts). The lighthouse keeper logs the weather "
        "every evening: wind from the west, light rain, visibility four miles, the tide turning at "
        "nine. The ferry to the island runs twice a day in winter and four times in summer; the "
        "harbour master posts changes on the board by the chandlery. "
    ) * 3
    kwargs = dict(model="SmolLM2-135M-Instruct", max_tokens=16, temperature=0, extra_body={"lookahead": lookahead})
    first = client.completions.create(prompt=doc + "\nQ: When does the tide turn?\nA:", **kwargs)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    prompt = doc + "\nQ: How often does the ferry run in summer?\nA:"
    second = client.completions.create(prompt=prompt, **kwargs)
    shared = len(tokenizer.encode(doc))
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 32 == 0 and shared - 32 < cached <= shared + 1  # whole blocks of the shared part
    assert second.model_extra["stats"]["cached_prompt_tokens"] == cached
    ids = tokenizer.encode(prompt)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
    assert second.choices[0].text == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    # echo with logprobs needs every prompt row computed: no hit, the same answer
    scored = client.completions.create(prompt=prompt, echo=True, logprobs=0, **kwargs)
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    assert scored.choices[0].text == prompt + second.choices[0].text
    metrics = httpx.get(server.url + "/metrics").text
    hits = [ln for ln in metrics.splitlines() if ln.startswith("trieserve_prefix_cache_hit_tokens_total ")]
    assert hits and float(hits[0].split()[-1]) >= cached


def test_n_choices_are_separate_sequences_streamed_or_whole(client):
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=11)
    whole = client.completions.create(n=3, **kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.text for c in whole.choices}) > 1  # sampled with different seeds
    single = client.completions.create(**kwargs)
    # the prompt counts once, the completions of every choice add up, and so does the work
    assert whole.usage.completion_tokens == 36 and whole.usage.prompt_tokens == single.usage.prompt_tokens
    assert whole.model_extra["stats"]["forward_passes"] >= 12 // 4  # the longest choice's, not a sum
    # choice 0 is the n=1 request with the same seed; the whole set is reproducible
    assert single.choices[0].text == whole.choices[0].text
    assert [c.text for c in client.completions.create(n=3, **kwargs).choices] == [c.text for c in whole.choices]
    # streamed: chunks of every choice, each ending with its own finish_reason, then one usage
    chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, reasons = ["", "", ""], [None, None, None]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in whole.choices] and reasons == ["length"] * 3
    assert chunks[-1].usage.completion_tokens == 36
    # chat, greedy: every choice is the greedy answer
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=8, temperature=0, n=2
    )
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


@pytest.mark.parametrize("lookahead", [False, True])
def test_min_tokens_holds_off_eos_and_stop_strings(client, lookahead):
    kwargs = dict(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Reply with one word: yes or no?"}],
        temperature=0,
        max_tokens=40,
    )
    short = client.chat.completions.create(**kwargs, extra_body={"lookahead": lookahead})
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 12
    held = client.chat.completions.create(**kwargs, extra_body={"lookahead": lookahead, "min_tokens": 12})
    assert held.usage.completion_tokens >= 12
    plain = client.chat.completions.create(**kwargs, extra_body={"lookahead": False, "min_tokens": 12})
    assert held.choices[0].message.content == plain.choices[0].message.content  # lookahead changes nothing
    # a stop string inside the first min_tokens tokens does not end the answer
    first_word = short.choices[0].message.content.strip()[:2]
    stopped = client.chat.completions.create(**kwargs, stop=[first_word], extra_body={"lookahead": lookahead})
    assert stopped.usage.completion_tokens < 12
    late = client.chat.completions.create(
        **kwargs, stop=[first_word], extra_body={"lookahead": lookahead, "min_tokens": 12}
    )
    assert late.usage.completion_tokens >= 12
    assert late.choices[0].message.content.startswith(short.choices[0].message.content.strip()[:2])


def test_n_choices_prefill_their_prompt_once(client, server, tokenizer):
    def hits() -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith("trieserve_prefix_cache_hit_tokens_total "):
                return float(line.split()[-1])
        raise AssertionError("no prefix cache counter")

    prompt = "A ledger of the harbour, entry by entry: " + " ".join(
        f"boat {i} left at {i % 12} o'clock." for i in range(40)
    )
    n_ids = len(tokenizer.encode(prompt))
    assert n_ids > 200
    before = hits()
    resp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=4, temperature=0.9, seed=3, n=3
    )
    assert len(resp.choices) == 3
    # the first choice's prefill feeds the cache; the other two load all but the last block
    assert hits() - before >= 2 * ((n_ids - 1) // 32) * 32


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "adakv", "defensive", "layer_defensive"])
def test_eviction_policies_over_http(client, policy):
    """Every policy, with the cache evicted at prefill and twice more while decoding (kv_regrow):
    the stats say what was kept of everything the sequence had seen at the last eviction."""
    words = " ".join(f"item{i} is {i * 7 % 13}." for i in range(60))
    resp = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=f"{words}\nList the items again:",
        max_tokens=80,
        temperature=0,
        extra_body={"kv_policy": policy, "kv_budget": 0.3, "kv_regrow": 32, "ignore_eos": True},
    )
    stats, prompt = resp.model_extra["stats"], resp.usage.prompt_tokens
    assert resp.usage.completion_tokens == 80 and prompt > 200
    assert stats["kv_evictions"] == 3  # prefill, then at prompt + 32 and prompt + 64 tokens
    assert stats["kv_tokens_total"] == prompt + 64
    assert stats["kv_tokens_kept"] == math.floor(0.3 * (prompt + 64) + 0.5)  # Eviction.keep's rounding
