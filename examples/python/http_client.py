"""Streams a completion from tessera's OpenAI-style HTTP API, resuming it on another
coordinator when the one it streams from dies. Standard library only.

Usage: python http_client.py [--endpoint 127.0.0.1:8080[,HOST:PORT...]] [--max-tokens N]
                             [--temperature T] [--seed S] [--chat] "prompt"

Prints the text as it arrives, then one line on stderr: the finish reason, the tokens and how
often the stream was resumed.

How it resumes (tessera's extensions of the OpenAI body, see docs/ARCHITECTURE.md):
- it asks for `return_token_ids`, so every chunk names the ids of the tokens it carries;
- the response's headers name its id (`x-request-id`) and seed (`x-tessera-seed`, drawn by the
  server when the request has none);
- when the connection breaks before `data: [DONE]` (the coordinator died), it sends the same
  body to the next endpoint of --endpoint with that seed and `resume: {"id": ..., "token_ids":
  [ids so far]}`, and the stream continues with exactly the tokens the broken one would have
  sent. (A coordinator that relays to a leader that died resumes by itself; this is for a
  client connected to the coordinator that died.)
"""

import argparse
import http.client
import json
import sys
import time

# How often one answer may be resumed, and how long to wait between tries.
MAX_RESUMES = 5
RETRY_PAUSE_S = 0.5


class Broken(Exception):
    """The stream ended before `[DONE]`: the answer may be resumed."""


def stream_once(endpoint: str, path: str, body: dict, state: dict) -> None:
    """Sends `body` to `endpoint` and relays its chunks to stdout, recording in `state` the
    response id, seed, token ids and finish reason. Raises Broken when it may be resumed."""
    host, _, port = endpoint.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        try:
            conn.request(
                "POST", path, json.dumps(body), {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
        except OSError as e:
            raise Broken(f"connect: {e}") from e
        if resp.status != 200:
            detail = resp.read().decode(errors="replace")
            # 502/503: no leader or no plan right now; another coordinator may serve it.
            if resp.status in (502, 503):
                raise Broken(f"HTTP {resp.status}: {detail}")
            raise RuntimeError(f"HTTP {resp.status}: {detail}")
        state.setdefault("id", resp.getheader("x-request-id"))
        if "seed" not in body and resp.getheader("x-tessera-seed") is not None:
            body["seed"] = int(resp.getheader("x-tessera-seed"))
        try:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error: {chunk['error'].get('message')}")
                for choice in chunk.get("choices", []):
                    text = choice.get("text")
                    if text is None:
                        text = choice.get("delta", {}).get("content") or ""
                    state["ids"].extend(choice.get("token_ids", []))
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    if choice.get("finish_reason"):
                        state["finish"] = choice["finish_reason"]
        except (OSError, http.client.HTTPException) as e:
            raise Broken(f"stream: {e}") from e
        raise Broken("the stream ended without [DONE]")
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("prompt")
    ap.add_argument("--endpoint", default="127.0.0.1:8080")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--chat", action="store_true")
    args = ap.parse_args()
    endpoints = [e for e in args.endpoint.split(",") if e]

    body = {
        "model": "",
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "return_token_ids": True,
    }
    if args.seed is not None:
        body["seed"] = args.seed
    if args.chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = args.prompt

    state = {"ids": []}
    resumes = 0
    attempt = 0
    while True:
        try:
            stream_once(endpoints[attempt % len(endpoints)], path, body, state)
            break
        except Broken as e:
            if resumes >= MAX_RESUMES:
                print(f"error: gave up after {resumes} resumptions: {e}", file=sys.stderr)
                return 1
            resumes += 1
            attempt += 1
            print(
                f"resuming after {len(state['ids'])} tokens on "
                f"{endpoints[attempt % len(endpoints)]}: {e}",
                file=sys.stderr,
            )
            if state.get("id"):
                body["resume"] = {"id": state["id"], "token_ids": [state["ids"]]}
            time.sleep(RETRY_PAUSE_S)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print()
    print(
        f"finish={state.get('finish')} tokens={len(state['ids'])} resumes={resumes}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
