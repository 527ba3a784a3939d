"""Asks a tessera coordinator's /v1/embeddings for one text's vector with the official
`openai` client (whose default asks for base64 and decodes it).

Usage: openai_embeddings.py BASE_URL MODEL TEXT
Prints the vector as a JSON list; the Rust test (embeddings.rs) compares it with the engine's.
"""
import json
import sys

import openai

base_url, model, text = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
resp = client.embeddings.create(model=model, input=text)
assert resp.data[0].index == 0, resp
assert resp.usage.prompt_tokens > 0, resp.usage
print(json.dumps([float(x) for x in resp.data[0].embedding]))
