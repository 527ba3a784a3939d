#!/usr/bin/env python3
"""Generate tessera's sentence-embedding goldens for all-MiniLM-L6-v2 (sentence-transformers).

Usage:
    python3 tests/golden/make_embedding_goldens.py [MODEL_DIR]

MODEL_DIR is the sentence-transformers directory (config.json, model.safetensors, tokenizer.json,
modules.json: Transformer -> Pooling(mean) -> Normalize, sentence_bert_config.json). It defaults to
$TESSERA_HOME/models/all-minilm-l6-v2 when TESSERA_HOME is set, else
~/.cache/tessera/models/all-minilm-l6-v2 (where `tessera model pull all-minilm-l6-v2` puts it).

The script re-executes itself inside a virtual environment with torch, transformers,
sentence-transformers, tokenizers, safetensors and numpy pinned (default tests/golden/.venv-embed,
or $GOLDEN_VENV when set; created and populated with pip when missing or when a version differs).
Everything runs in float32 on the CPU with N_THREADS torch threads.

It writes minilm/embeddings.json next to itself:
  header     versions, sha256 of model.safetensors and tokenizer.json, max_seq_length, threads;
  cases      for each of the SENTENCES: the token ids exactly as sentence-transformers feeds the
             model (one sentence, truncated to max_seq_length, [CLS] ... [SEP], no padding), the
             wordpiece strings, the untruncated length, the normalized embedding of
             model.encode(sentence) alone, and the same sentence's embedding when all SENTENCES
             are encoded as one call (batch_size=32: sentence-transformers sorts by length and
             pads each batch to its longest member), with their max |difference| and cosine;
  batch_vs_single  the max |difference| and min cosine over all sentences: the reference's own
             batching noise, a floor for any tolerance a test uses.
Floats are the shortest decimal strings that round-trip the float32 value (parse them as f32).
Tests never run this.
"""

import hashlib
import json
import os
import platform
import sys

from golden_venv import PINS, ensure

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "minilm")
N_THREADS = 2
BATCH_SIZE = 32
MODEL_NAME = "all-minilm-l6-v2"


def ensure_venv():
    """Re-run this script under the venv that has the pinned packages (golden_venv.py)."""
    ensure(__file__)


def long_english():
    return (
        "The lighthouse at the end of the northern breakwater was built in 1871, when the harbour "
        "was still the busiest on this stretch of coast and dozens of fishing boats came home every "
        "evening through a channel barely wide enough for two of them to pass. Its first keeper, a "
        "retired sailor named Thomas Avery, kept a diary for thirty-one years in which he recorded "
        "the weather, the ships he saw, the oil he burned and, occasionally, his opinion of the "
        "harbour master, which was rarely flattering. In the winter of 1883 a storm destroyed the "
        "wooden walkway that connected the tower to the shore, and for eleven days Avery and his "
        "young assistant were cut off, living on biscuits, salted herring and rainwater collected "
        "in a canvas sheet stretched across the gallery. They kept the lamp burning every night. "
        "When the weather finally cleared, the townspeople rowed out with bread, coffee and a "
        "bottle of brandy, and found the two men asleep on the floor of the lamp room, the diary "
        "open beside them at an entry that read simply: 'Light shown. Wind north-east, severe. "
        "No vessels.' The tower was electrified in 1927 and automated in 1968, and today the "
        "building houses a small museum where visitors can read a facsimile of the diary, climb "
        "the one hundred and twelve steps to the gallery, and look out over a harbour that now "
        "shelters more yachts than fishing boats. On clear days you can see the islands twenty "
        "miles to the west, and on stormy ones the spray still reaches the lowest windows."
    )


def long_code():
    parts = ["import math", "", "", "class Accumulator:", "    \"\"\"Running statistics.\"\"\"", ""]
    for i in range(24):
        parts.append(f"    def step_{i}(self, values: list[float]) -> float:")
        parts.append(f"        total = sum(v * {i + 1} for v in values if v > {i})")
        parts.append(f"        return math.sqrt(total) / max(len(values), {i + 2})")
        parts.append("")
    return "\n".join(parts)


def long_chinese():
    return "".join([
        "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。",
        "该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。",
        "自从人工智能诞生以来，理论和技术日益成熟，应用领域也不断扩大。",
        "可以设想，未来人工智能带来的科技产品，将会是人类智慧的容器。",
        "人工智能可以对人的意识、思维的信息过程进行模拟。",
        "人工智能不是人的智能，但能像人那样思考，也可能超过人的智能。",
        "北京、上海、广州和深圳的许多公司都在开发大型语言模型，用于翻译、写作、编程和客户服务。",
        "然而，这些系统也带来了新的问题：数据隐私、版权、能源消耗以及对就业的影响，都需要社会认真讨论。",
        "研究人员认为，透明的评估方法和开放的基准测试对于建立公众信任至关重要。",
    ])


def long_mixed():
    rows = []
    for i in range(1, 31):
        rows.append(f"Item {i}: café №{i * 7} — цена {i * 3.5:.2f} €, 温度 {i}°C, ok✓")
    return "; ".join(rows) + "."


# Inputs for the golden: ordinary text and every class of input the BERT normalizer,
# pre-tokenizer and WordPiece treat differently. Exactly 64.
SENTENCES = [
    # plain English, short to medium
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome, I really enjoyed it from start to finish.",
    ("Sentence embeddings map a piece of text to a fixed-size vector so that texts with similar "
     "meanings end up close to each other, which makes them useful for semantic search, "
     "clustering and deduplication."),
    # questions, punctuation, numbers
    "What is the capital of France?",
    "How do I reset my password if I no longer have access to my email account?",
    "Wait... what?! No way — that's impossible!!!",
    "Pi is 3.14159265358979 and e is 2.718; 1,000,000 items cost $42.50 (incl. 7.5% tax).",
    "Order #A-1234-XYZ shipped on 2024-03-15T10:30:00Z to 221B Baker St., London NW1 6XE.",
    "I'm sure you're right, they've said we'll see; he'd won't can't.",
    # code and structured text
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}\n",
    "SELECT id, name FROM users WHERE created_at > '2023-01-01' ORDER BY name DESC LIMIT 10;",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}',
    # accents, diacritics, German
    "Café naïve résumé façade coöperate Ångström",
    "Combining: e\u0301 a\u0308 n\u0303 vs é ä ñ",
    "Die Straße ist groß und die Füße sind müde.",
    "STRASSE vs straße vs Straße",
    "Łódź, Ærø, œuvre, Český Krumlov, Dvořák",
    "Tiếng Việt có nhiều dấu: ắ ằ ẳ ẵ ặ.",
    # CJK
    "中文分词测试：你好，世界！",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストとカタカナ、ひらがな。",
    "東京は日本の首都です。",
    "한국어 텍스트입니다. 안녕하세요!",
    # other scripts
    "مرحبا بالعالم، هذا نص عربي",
    "مَرْحَبًا بِكُمْ",
    "שלום עולם",
    "Привет, мир! Это тест.",
    "Київ — столиця України; ґанок, їжак, є.",
    "Ελληνικά γράμματα αβγ· Καλημέρα!",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Tessera 是一个 distributed inference server, очень быстрый! 🚀",
    # emoji and ZWJ sequences
    "Emoji: 😀 🎉 👍🏽 🇫🇷",
    "Family: 👨\u200d👩\u200d👧\u200d👦 and 👩\u200d💻 and 🏳\ufe0f\u200d🌈",
    "I love pizza 🍕🍕🍕!!!",
    # control characters and odd whitespace
    "tabs\t\there\tand\tthere",
    "newlines\n\n\nmany\r\nwindows\r\n",
    "Zero\u200bwidth\u200cjoiners\u200dand\ufeffBOM",
    "non\u00a0breaking\u00a0space and\u2003em\u2003space and\u3000ideographic",
    "bell\x07 backspace\x08 escape\x1b[31mred\x1b[0m null\x00 del\x7f end",
    "   leading and trailing spaces   ",
    "          ",
    "",
    # single words, case, repetition
    "word",
    "Supercalifragilisticexpialidocious",
    "THIS IS ALL CAPS AND VERY LOUD, OKAY?",
    "The the THE tHe",
    "hahahahahahahahahahahahahahahahahahahahahahahaha",
    "a" * 120,  # longer than WordPiece's 100-character word limit: one [UNK]
    "!!!!!!!!!!????????........",
    # URL, e-mail, markup, symbols, math
    "See https://example.com/path/to/page?q=1&r=two#frag and http://localhost:8080/",
    "Contact me at john.doe+newsletter@example.co.uk or support@tessera.dev.",
    "@user #hashtag $TSLA 50% off!!! <b>bold</b> &amp; &lt;tag&gt;",
    "[CLS] [SEP] [MASK] [PAD] [UNK] literal special tokens",
    "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ = ∫₀¹ f(x) dx ≈ 3.14; ٣٤٥ ⅔ 𝟙𝟚𝟛; ﬁ ﬂ ＡＢＣ１２３",
    # long: well over max_seq_length wordpieces, truncated to [CLS] + 254 + [SEP]
    long_english(),
    long_code(),
    long_chinese(),
    long_mixed(),
    # right at the limit: 254 wordpieces fill 256 exactly
    " ".join(["word"] * 254),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_dir():
    home = os.environ.get("TESSERA_HOME")
    if home:
        return os.path.join(home, "models", MODEL_NAME)
    return os.path.join(os.path.expanduser("~"), ".cache", "tessera", "models", MODEL_NAME)


def main():
    ensure_venv()
    import numpy as np
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    assert len(SENTENCES) == 64, len(SENTENCES)
    assert len(set(SENTENCES)) == len(SENTENCES), "duplicate sentence"
    model_dir = sys.argv[1] if len(sys.argv) > 1 else default_model_dir()
    for name in ("model.safetensors", "tokenizer.json", "modules.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            sys.exit(f"usage: make_embedding_goldens.py [MODEL_DIR]: no {name} in {model_dir}")

    torch.set_num_threads(N_THREADS)
    torch.set_num_interop_threads(1)
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    # sentence-transformers >= 6 renamed tokenize to preprocess; keep both working.
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    tok = model.tokenizer
    max_len = model.max_seq_length
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok_json = json.load(f)

    header = {
        "model": MODEL_NAME,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "model_safetensors_sha256": sha256(os.path.join(model_dir, "model.safetensors")),
        "tokenizer_json_sha256": sha256(os.path.join(model_dir, "tokenizer.json")),
        "max_seq_length": max_len,
        "dim": (getattr(model, "get_embedding_dimension", None)
                or model.get_sentence_embedding_dimension)(),
        "pipeline": [type(m).__name__ for m in model],
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "batch_size": BATCH_SIZE,
        # tokenizer.json carries its own truncation (128) and fixed padding (128) settings;
        # sentence-transformers overrides both (max_seq_length, pad to the batch's longest).
        "tokenizer_json_ignored": {k: tok_json.get(k) for k in ("truncation", "padding")},
    }

    def f32_list(vec):
        vec = np.asarray(vec, dtype=np.float32)
        out = [float(np.format_float_scientific(x, unique=True)) for x in vec]
        assert np.array_equal(np.array(out, dtype=np.float32), vec), "float32 round trip"
        return out

    with torch.inference_mode():
        single = []
        for s in SENTENCES:
            single.append(model.encode(s, convert_to_numpy=True, show_progress_bar=False))
        single = np.stack(single).astype(np.float32)
        batched = model.encode(SENTENCES, batch_size=BATCH_SIZE, convert_to_numpy=True,
                               show_progress_bar=False).astype(np.float32)
    assert single.shape == batched.shape == (len(SENTENCES), header["dim"])

    cases = []
    for i, s in enumerate(SENTENCES):
        enc = tokenize([s])
        ids = [int(t) for t in enc["input_ids"][0]]
        assert all(int(m) == 1 for m in enc["attention_mask"][0]), "padding in a single input"
        full = tok(s, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        assert len(ids) == min(len(full), max_len)
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        diff = float(np.max(np.abs(single[i] - batched[i])))
        cos = float(np.dot(single[i].astype(np.float64), batched[i].astype(np.float64)) /
                    (np.linalg.norm(single[i].astype(np.float64)) *
                     np.linalg.norm(batched[i].astype(np.float64))))
        cases.append({
            "text": s,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "untruncated_len": len(full),
            "truncated": len(full) > max_len,
            "norm": round(float(np.linalg.norm(single[i].astype(np.float64))), 7),
            "embedding": f32_list(single[i]),
            "batched_embedding": f32_list(batched[i]),
            "batched_max_abs_diff": diff,
            "batched_cosine": cos,
        })
    n_trunc = sum(c["truncated"] for c in cases)
    assert n_trunc >= 4, f"only {n_trunc} inputs exceed max_seq_length"
    assert len(cases[-1]["ids"]) == max_len and not cases[-1]["truncated"]

    summary = {
        "max_abs_diff": max(c["batched_max_abs_diff"] for c in cases),
        "min_cosine": min(c["batched_cosine"] for c in cases),
        "note": ("model.encode(all SENTENCES, batch_size=32) against model.encode(each alone); "
                 "the batched call sorts inputs by length and pads each batch to its longest"),
    }
    note = ("ids: model.preprocess([text])['input_ids'] (sentence-transformers' tokenize): "
            "[CLS] ... [SEP], truncated to max_seq_length, no padding. embedding: "
            "model.encode(text), Transformer -> mean pooling -> L2 normalize, float32 on CPU. "
            "Floats are shortest float32 round-trip decimals: parse as f32.")
    os.makedirs(OUT_DIR, exist_ok=True)
    write("embeddings.json", {**header, "note": note, "batch_vs_single": summary, "cases": cases})
    print(f"{len(cases)} sentences, {n_trunc} truncated; batch vs single: max |diff| "
          f"{summary['max_abs_diff']:.3e}, min cosine {summary['min_cosine']:.9f}", file=sys.stderr)


def write(name, obj):
    path = os.path.join(OUT_DIR, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
