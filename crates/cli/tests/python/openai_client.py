"""Drives a tessera coordinator's OpenAI-compatible HTTP API with the official `openai` client.

Usage: openai_client.py BASE_URL API_KEY MODEL  (API_KEY "none": the server takes no keys)
Prints one JSON object on stdout: the text of each call (chat and completions, streamed and
not), what the calls' usage and finish reasons were, and (with a key) the status of a call
with a wrong one.
The Rust test (openai_client.rs) compares the texts with the gRPC API's.
"""
import json
import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
QUESTION = "What is the capital of France?"
PROMPT = "The capital of France is"
MAX_TOKENS = 12

out = {}
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": QUESTION}],
    temperature=0,
    max_tokens=MAX_TOKENS,
)
out["chat"] = chat.choices[0].message.content
out["chat_finish"] = chat.choices[0].finish_reason
out["chat_usage"] = [chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens]

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": QUESTION}],
    temperature=0,
    max_completion_tokens=MAX_TOKENS,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    for choice in chunk.choices:
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
out["chat_stream"] = "".join(pieces)
out["chat_stream_finish"] = finish
out["chat_stream_usage"] = usage

completion = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS)
out["completion"] = completion.choices[0].text

stream = client.completions.create(
    model=model, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS, stream=True
)
out["completion_stream"] = "".join(c.choices[0].text for c in stream if c.choices)

out["models"] = [m.id for m in client.models.list()]

if api_key != "none":
    try:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        out["wrong_key"] = 200
    except openai.AuthenticationError as e:
        out["wrong_key"] = e.status_code

try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], temperature=9
    )
    out["bad_temperature"] = None
except openai.BadRequestError as e:
    out["bad_temperature"] = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

print(json.dumps(out))
