#!/usr/bin/env python3
"""Drives a running `hici serve` with the official `openai` Python client.

Checks: models, chat (plain and streamed give the same text; the answer contains --expect),
completions (plain == streamed), usage, the error cases (401, 404, 400 for n=2 and for a
prompt + max_tokens past the context, naming both numbers), and 16 concurrent greedy streams
that each equal their one-at-a-time answer. Prints one JSON summary line; exits 1 on failure.

Usage: openai_client.py --base-url http://127.0.0.1:8080/v1 --api-key KEY --model ID
       [--expect Paris] [--context 2048]
"""

import argparse
import concurrent.futures
import json
import sys
import time

import openai


def chat(client, model, text, max_tokens, stream):
    kw = dict(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
    )
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    out, finish, usage, first = [], None, None, None
    t0 = time.time()
    for chunk in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                if first is None:
                    first = time.time() - t0
                out.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return "".join(out), finish, usage


def expect_status(fn, exc, status, needles=()):
    try:
        fn()
    except exc as e:
        assert e.status_code == status, (e.status_code, status, str(e))
        body = e.body if isinstance(e.body, dict) else {}
        msg = str(body.get("message", e))
        for n in needles:
            assert n in msg, (n, msg)
        return msg
    raise AssertionError(f"expected HTTP {status}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--expect", default=None)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=600)
    summary = {}

    ids = [m.id for m in client.models.list().data]
    assert ids == [a.model], ids

    q = "What is the capital of France?"
    t0 = time.time()
    plain, finish, usage = chat(client, a.model, q, 24, stream=False)
    summary["chat_plain_s"] = round(time.time() - t0, 3)
    streamed, sfinish, susage = chat(client, a.model, q, 24, stream=True)
    assert plain == streamed, (plain, streamed)
    assert finish == sfinish and finish in ("stop", "length"), (finish, sfinish)
    assert usage.completion_tokens == susage.completion_tokens > 0, (usage, susage)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if a.expect:
        assert a.expect in plain, plain
    summary["answer"] = plain

    c = client.completions.create(model=a.model, prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    cs = "".join(
        ch.choices[0].text
        for ch in client.completions.create(model=a.model, prompt="The capital of France is",
                                            max_tokens=8, temperature=0, stream=True)
        if ch.choices
    )
    assert c.choices[0].text == cs, (c.choices[0].text, cs)
    summary["completion"] = cs

    bad = openai.OpenAI(base_url=a.base_url, api_key="wrong", max_retries=0)
    expect_status(lambda: bad.models.list(), openai.AuthenticationError, 401)
    expect_status(lambda: chat(client, "no-such-model", q, 4, False), openai.NotFoundError, 404)
    expect_status(
        lambda: client.chat.completions.create(
            model=a.model, messages=[{"role": "user", "content": q}], n=2),
        openai.BadRequestError, 400, ["n: 1"])
    over = a.context
    msg = expect_status(lambda: chat(client, a.model, q, over, False), openai.BadRequestError,
                        400, [f"max_tokens is {over}", f"context of {a.context}"])
    summary["context_error"] = msg

    prompts = [f"Name a colour. Answer {i}." for i in range(a.concurrency)]
    alone = [chat(client, a.model, p, 6, stream=False)[0] for p in prompts]
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as ex:
        together = list(ex.map(lambda p: chat(client, a.model, p, 6, stream=True)[0], prompts))
    summary["concurrent_s"] = round(time.time() - t0, 3)
    assert together == alone, list(zip(together, alone))
    summary["concurrent_streams"] = a.concurrency
    print(json.dumps(summary))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e!r}", file=sys.stderr)
        sys.exit(1)
