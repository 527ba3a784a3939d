#!/usr/bin/env python3
"""Generate tessera's llama.cpp goldens for the default model (SmolLM2-135M-Instruct Q4_1).

Usage:
    python3 tests/golden/make_goldens.py [MODEL.gguf]

The model path defaults to $TESSERA_MODEL_GGUF. The script re-executes itself inside a virtual
environment that has llama-cpp-python pinned (default tests/golden/.venv, or $GOLDEN_VENV when
set; it is created and populated with pip when missing, which compiles llama.cpp: minutes).

It writes, next to itself:
  tokens.json  token ids from llama.cpp's tokenizer (special=True for every string, special=False
               for some) and the detokenized text of each id list;
  logits.json  teacher-forced top-20 (id, logit) at every position of 8 prompts;
  greedy.json  64 greedy (argmax) tokens per prompt with the top-1/top-2 logits and margin.
Each file records the llama-cpp-python version and the GGUF's sha256. Tests never run this.
"""

import hashlib
import json
import os
import subprocess
import sys
import venv

LLAMA_CPP_PYTHON = "0.3.36"
HERE = os.path.dirname(os.path.abspath(__file__))
TOP_K = 20
GREEDY_STEPS = 64
N_THREADS = 2


def ensure_venv():
    """Re-run this script under a venv that has the pinned llama-cpp-python."""
    env_dir = os.environ.get("GOLDEN_VENV") or os.path.join(HERE, ".venv")
    py = os.path.join(env_dir, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(env_dir):
        return
    if not os.path.exists(py):
        print(f"creating venv {env_dir}", file=sys.stderr)
        venv.create(env_dir, with_pip=True)
    probe = subprocess.run(
        [py, "-c", "import llama_cpp, sys; sys.stdout.write(llama_cpp.__version__)"],
        capture_output=True, text=True,
    )
    if probe.returncode != 0 or probe.stdout.strip() != LLAMA_CPP_PYTHON:
        print(f"installing llama-cpp-python=={LLAMA_CPP_PYTHON} (compiles llama.cpp)", file=sys.stderr)
        subprocess.run([py, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
    os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


# Strings for the tokenizer golden: every class of input the pre-tokenizer treats differently.
TOKEN_STRINGS = [
    "",
    " ",
    "Hello, world!",
    "hello world",
    " Hello",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right, they've said we'll see; he'd won't can't.",
    "I'M SURE YOU'RE RIGHT AND THEY'VE GONE",
    "Café naïve résumé façade coöperate Ångström",
    "Straße, œuvre, Ærø, Łódź, Český Krumlov",
    "Emoji: 😀 🎉 👍🏽 🇫🇷",
    "Family: 👨‍👩‍👧‍👦 and 👩‍💻 and 🏳️‍🌈",
    "中文分词测试：你好，世界！",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다",
    "مرحبا بالعالم، هذا نص عربي",
    "Привет, мир! Это тест.",
    "Ελληνικά γράμματα αβγ",
    "12345678901234567890",
    "Pi is 3.14159265358979 and e is 2.718; 1,000,000 items cost $42.50.",
    "٣٤٥ and ⅔ and ²³ and 𝟙𝟚𝟛",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}\n",
    "    leading spaces",
    "trailing spaces    ",
    "tabs\t\there\tand\tthere",
    "newlines\n\n\nmany\r\nwindows\r\n",
    "mixed \t \n whitespace \n\t runs  \n",
    "a  b   c    d     e",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_start and im_end|> <repo_name> <file_sep>",
    "URL https://example.com/path?q=1&r=two#frag and email a.b@c.org",
    "Symbols: @#$%^&*()_+-=[]{}|;':\",./<>?`~ ¡¿ §¶ €£¥ ©®™",
    "Zero\u200bwidth\u200cjoiners\u200dand\ufeffBOM",
    "Combining: e\u0301 a\u0308 n\u0303 vs é ä ñ",
    ("In the beginning the Universe was created. This has made a lot of people very angry and "
     "been widely regarded as a bad move. Many races believe that it was created by some sort of "
     "god, though the Jatravartid people of Viltvodle VI believe that the entire Universe was in "
     "fact sneezed out of the nose of a being called the Great Green Arkleseizure. The Jatravartids, "
     "who live in perpetual fear of the time they call The Coming of The Great White Handkerchief, "
     "are small blue creatures with more than fifty arms each, who are therefore unique in being "
     "the only race in history to have invented the aerosol deodorant before the wheel. 42!"),
]
# special=False for a few: special-token text must then be BPE'd as plain text.
NON_SPECIAL_INDICES = [i for i, s in enumerate(TOKEN_STRINGS) if "<" in s] + [2, 10]

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chat(user, system=SYSTEM):
    return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def quicksort(arr):\n    ",
    "1, 2, 3, 4, 5, 6,",
    chat("What is the capital of France?"),
    chat("Write a haiku about autumn leaves."),
    chat("Explain recursion to a five year old in two sentences."),
    chat("Translate to French: I love reading books.",
         "<|im_start|>system\nYou are a precise translator.<|im_end|>\n"),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ensure_venv()
    import ctypes

    import llama_cpp
    import numpy as np

    model_path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TESSERA_MODEL_GGUF")
    if not model_path or not os.path.isfile(model_path):
        sys.exit("usage: make_goldens.py MODEL.gguf (or set TESSERA_MODEL_GGUF)")
    header = {
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": os.path.basename(model_path),
        "gguf_sha256": sha256(model_path),
    }
    llm = llama_cpp.Llama(
        model_path=model_path, n_threads=N_THREADS, n_threads_batch=N_THREADS,
        n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True, verbose=False, seed=0,
    )
    vocab = llm._model.vocab

    def piece(tok, special):
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(vocab, tok, buf, 256, 0, special)
        assert 0 <= n <= 256
        return buf.raw[:n]

    def detok(ids, special):
        # Concatenated pieces, without llama-cpp-python's leading-space stripping.
        return b"".join(piece(t, special) for t in ids).decode("utf-8", errors="replace")

    # 1. tokens.json
    cases = []
    for i, text in enumerate(TOKEN_STRINGS):
        for special in ([True, False] if i in NON_SPECIAL_INDICES else [True]):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
            cases.append({
                "text": text, "parse_special": special, "ids": ids,
                "decoded": detok(ids, True), "decoded_skip_special": detok(ids, False),
            })
    write("tokens.json", {**header, "add_bos": False, "cases": cases})

    # 2. logits.json (teacher forced) and 3. greedy.json
    def top(row, k):
        idx = np.argsort(-row, kind="stable")[:k]
        return [int(i) for i in idx], [round(float(row[i]), 5) for i in idx]

    logit_cases, greedy_cases = [], []
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        positions = []
        for p in range(len(ids)):
            tid, tl = top(llm.scores[p], TOP_K)
            positions.append({"ids": tid, "logits": tl})
        logit_cases.append({"prompt": prompt, "ids": ids, "top_k": TOP_K, "positions": positions})

        steps, out = [], []
        for _ in range(GREEDY_STEPS):
            row = llm.scores[llm.n_tokens - 1]
            (t1, t2), (l1, l2) = top(row, 2)
            steps.append({"top1": t1, "top1_logit": l1, "top2": t2, "top2_logit": l2,
                          "margin": round(l1 - l2, 5)})
            out.append(t1)
            llm.eval([t1])
        first_eog = next((i for i, t in enumerate(out) if llama_cpp.llama_vocab_is_eog(vocab, t)), None)
        greedy_cases.append({"prompt": prompt, "prompt_ids": ids, "tokens": out,
                             "text": detok(out, True), "first_eog": first_eog, "steps": steps})
        print(f"prompt {len(greedy_cases)}: {len(ids)} tokens -> {detok(out, True)[:60]!r}", file=sys.stderr)

    note = ("argmax over raw logits (ties: lowest id); llama.cpp n_threads=2, add_bos=False, "
            "parse_special=True; generation continues past end-of-generation tokens")
    write("logits.json", {**header, "note": note, "cases": logit_cases})
    write("greedy.json", {**header, "note": note, "steps": GREEDY_STEPS, "cases": greedy_cases})


def write(name, obj):
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
