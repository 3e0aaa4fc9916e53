"""Drives inferd's OpenAI-compatible HTTP API with the official `openai` client.

Usage: openai_client.py SCENARIO BASE_URL API_KEY
Scenarios: mock (the mock engine, key required, queue depth 0, slow tokens),
notready (a daemon whose backend never loads), llama (the tiny llama model).
Prints "ALL OK" when every check passed; any failure raises (non-zero exit).
"""

import json
import sys

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def user(text):
    return [{"role": "user", "content": text}]


def mock(base_url, key):
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)

    ids = [m.id for m in client.models.list()]
    check(ids == ["mock"], f"models.list() names the served backend: {ids}")

    r = client.chat.completions.create(model="anything", messages=user("hello there world"))
    check(r.choices[0].message.content == "hello there world", "non-streaming content")
    check(r.choices[0].finish_reason == "stop", "finish_reason stop")
    check(r.model == "mock", "the response names the served model")
    check(r.usage.completion_tokens == 3, f"usage: {r.usage}")
    check(r.usage.total_tokens == r.usage.prompt_tokens + 3, "total_tokens")

    stream = client.chat.completions.create(
        model="x",
        messages=user("one two three"),
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    check(text == "one two three", f"streamed text: {text!r}")
    check(finish == "stop", "streamed finish_reason")
    check(usage is not None and usage.completion_tokens == 3, f"usage chunk: {usage}")

    r = client.chat.completions.create(
        model="x", messages=user("alpha beta gamma delta"), stop=[" gamma", "zzz"]
    )
    check(r.choices[0].message.content == "alpha beta", "stop ends before the match")
    check(r.choices[0].finish_reason == "stop", "stop gives finish_reason stop")

    r = client.chat.completions.create(
        model="x",
        messages=user('{"answer": 42, "ok": true}'),
        response_format={"type": "json_object"},
    )
    parsed = json.loads(r.choices[0].message.content)
    check(parsed == {"answer": 42, "ok": True}, f"json_object output parses: {parsed}")

    try:
        client.chat.completions.create(model="x", messages=user("hi"), n=2)
        check(False, "n=2 must be refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "n" in str(e), f"BadRequestError: {e}")

    try:
        OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        check(False, "a wrong key must be refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "AuthenticationError")

    # Occupy the one place with a slow stream, then ask again: 429.
    long_prompt = " ".join(f"w{i}" for i in range(2000))
    busy = client.chat.completions.create(model="x", messages=user(long_prompt), stream=True)
    first = next(iter(busy))
    check(first.choices[0].delta.role == "assistant", "the slow stream started")
    try:
        client.chat.completions.create(model="x", messages=user("hi"))
        check(False, "a full queue must be refused")
    except openai.RateLimitError as e:
        check(e.status_code == 429, "RateLimitError")
    busy.close()


def notready(base_url, key):
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    try:
        client.chat.completions.create(model="x", messages=user("hi"))
        check(False, "a daemon that is not ready must refuse")
    except openai.APIStatusError as e:
        check(e.status_code == 503, f"APIStatusError 503: {e}")


def llama(base_url, key):
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model="x", messages=user("Tell me a story"), max_tokens=8, temperature=0, seed=1
    )
    check(isinstance(r.choices[0].message.content, str), "a plain completion")
    check(r.choices[0].finish_reason in ("stop", "length"), "its finish_reason")
    check(0 < r.usage.completion_tokens <= 8, f"usage: {r.usage}")
    stream = client.chat.completions.create(
        model="x", messages=user("Tell me a story"), max_tokens=8, temperature=0, seed=1,
        stream=True,
    )
    text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    check(text == r.choices[0].message.content, "streamed and whole answers agree")


def main():
    scenario, base_url, key = sys.argv[1:4]
    {"mock": mock, "notready": notready, "llama": llama}[scenario](base_url, key)
    print("ALL OK")


if __name__ == "__main__":
    main()
