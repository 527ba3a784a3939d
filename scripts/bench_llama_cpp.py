#!/usr/bin/env python3
"""llama.cpp's side of `tessera bench`: prefill and decode speed through llama-cpp-python.

Takes the same token ids tessera used and prints one JSON line:
{"prefill_tok_s": ..., "decode_tok_s": ...}, best of --runs after one warm-up, like tessera.
Decode is greedy (argmax of the logits) so no sampler cost is measured on either side.
"""
import argparse
import json
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", required=True, help="JSON list of prompt token ids")
    a = ap.parse_args()
    ids = json.loads(a.tokens)
    llm = Llama(
        model_path=a.model,
        n_ctx=max(2048, len(ids) + a.decode + 16),
        n_batch=max(512, len(ids)),
        n_ubatch=max(512, len(ids)),
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    best_prefill = best_decode = 0.0
    for run in range(a.runs + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = len(ids) / (time.perf_counter() - t)

        llm.reset()
        llm.eval(ids[:16])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = None
        for step in range(a.decode - 1):
            if step == 0:
                t = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode = (a.decode - 1) / (time.perf_counter() - t)
        if run > 0:
            best_prefill = max(best_prefill, prefill)
            best_decode = max(best_decode, decode)
    print(json.dumps({"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}))


if __name__ == "__main__":
    main()
