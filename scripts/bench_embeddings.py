#!/usr/bin/env python3
"""sentence-transformers' side of the embedding benchmark: CPU throughput of model.encode.

Usage:
    python3 scripts/bench_embeddings.py --model DIR [--threads 2] [--batch 32]
                                        [--sentences builtin|FILE] [--seconds 20] [--write-corpus]

Runs float32 on the CPU with torch.set_num_threads(--threads) and one inter-op thread, encodes the
whole corpus once to warm up, then times model.encode(corpus, batch_size=--batch) back to back
until at least --seconds have passed, and prints one JSON line:
{"sentences_per_s": ..., "threads": ..., "batch": ..., "sentences": ..., "tokens": ..., "torch": ...}
(plus tokens_per_s, passes, seconds and the load average before and after). `tokens` counts the
wordpieces of one pass after truncation to max_seq_length, [CLS] and [SEP] included, padding not.

The builtin corpus is 512 sentences derived deterministically from the 64 sentences of
tests/golden/minilm/embeddings.json (8 variants of each, see build_corpus). It is also stored as
tests/golden/minilm/bench_corpus.json so a Rust benchmark can feed the very same inputs; the script
refuses to run when the stored copy differs from what it builds (--write-corpus rewrites it).
FILE may be a JSON list of strings, a JSON object with "sentences", or a text file (one per line).

Needs torch and sentence-transformers: without them it re-executes itself under the venv that
tests/golden/make_embedding_goldens.py makes (tests/golden/.venv-embed, or $GOLDEN_VENV).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "minilm", "embeddings.json")
CORPUS = os.path.join(ROOT, "tests", "golden", "minilm", "bench_corpus.json")
CORPUS_SIZE = 512


def ensure_deps():
    try:
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        env_dir = os.environ.get("GOLDEN_VENV") or os.path.join(ROOT, "tests", "golden", ".venv-embed")
        py = os.path.join(env_dir, "bin", "python")
        if os.path.realpath(sys.prefix) == os.path.realpath(env_dir) or not os.path.exists(py):
            sys.exit("needs torch and sentence-transformers: run tests/golden/make_embedding_goldens.py "
                     "once to create tests/golden/.venv-embed, or set GOLDEN_VENV")
        os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


def build_corpus():
    """512 sentences: each golden sentence in 8 fixed variants, variant-major order."""
    with open(GOLDEN, encoding="utf-8") as f:
        base = [c["text"] for c in json.load(f)["cases"]]
    n = len(base)
    variants = [
        lambda i, s: s,
        lambda i, s: s.lower(),
        lambda i, s: s.upper(),
        lambda i, s: f"Q{i}: {s}",
        lambda i, s: f"{s} (see note {i})",
        lambda i, s: " ".join(reversed(s.split(" "))),
        lambda i, s: f"{s} {base[(i * 7 + 3) % n]}",
        lambda i, s: f"In short, {s[: max(1, len(s) // 2)]}",
    ]
    corpus = [v(i, s) for v in variants for i, s in enumerate(base)]
    assert len(corpus) == CORPUS_SIZE, len(corpus)
    return corpus


def load_sentences(arg):
    if arg == "builtin":
        corpus = build_corpus()
        if os.path.exists(CORPUS):
            with open(CORPUS, encoding="utf-8") as f:
                stored = json.load(f)["sentences"]
            if stored != corpus:
                sys.exit(f"{CORPUS} differs from the builtin corpus; rerun with --write-corpus")
        return corpus
    with open(arg, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        return data["sentences"] if isinstance(data, dict) else list(data)
    except json.JSONDecodeError:
        return [line for line in text.splitlines() if line]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="sentence-transformers model directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sentences", default="builtin", help="'builtin' or a corpus file")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--write-corpus", action="store_true",
                    help=f"write the builtin corpus to {os.path.relpath(CORPUS, ROOT)}")
    a = ap.parse_args()
    ensure_deps()
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    model = SentenceTransformer(a.model, device="cpu")
    model.eval()
    tokenize = getattr(model, "preprocess", None) or model.tokenize

    if a.write_corpus:
        corpus = build_corpus()
    else:
        corpus = load_sentences(a.sentences)
    with torch.inference_mode():
        lengths = [int(n) for n in tokenize(corpus)["attention_mask"].sum(dim=1)]
    tokens = sum(lengths)

    if a.write_corpus:
        obj = {
            "note": ("builtin corpus of scripts/bench_embeddings.py: the 64 sentences of "
                     "embeddings.json in 8 variants each (variant-major). lengths: wordpieces per "
                     "sentence as sentence-transformers feeds the model (truncated to "
                     "max_seq_length, [CLS] and [SEP] included)"),
            "max_seq_length": model.max_seq_length,
            "tokens": tokens,
            "lengths": lengths,
            "sentences": corpus,
        }
        with open(CORPUS, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {CORPUS}", file=sys.stderr)

    load_before = os.getloadavg()
    with torch.inference_mode():
        model.encode(corpus, batch_size=a.batch, show_progress_bar=False)  # warm-up
        passes = 0
        start = time.perf_counter()
        while True:
            model.encode(corpus, batch_size=a.batch, show_progress_bar=False)
            passes += 1
            elapsed = time.perf_counter() - start
            if elapsed >= a.seconds:
                break
    print(json.dumps({
        "sentences_per_s": round(passes * len(corpus) / elapsed, 2),
        "threads": a.threads,
        "batch": a.batch,
        "sentences": len(corpus),
        "tokens": tokens,
        "torch": torch.__version__,
        "tokens_per_s": round(passes * tokens / elapsed, 1),
        "passes": passes,
        "seconds": round(elapsed, 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
