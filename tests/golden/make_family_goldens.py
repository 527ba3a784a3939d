#!/usr/bin/env python3
"""Generate the model-family goldens: small deterministic random-weight checkpoints of GPT-2,
T5, FLAN-T5 (gated GELU), Marian and Mistral with a sliding window, and transformers' logits
and greedy outputs for each.

Usage:
    python3 tests/golden/make_family_goldens.py

Re-executes itself inside the pinned venv of golden_venv.py (tests/golden/.venv-embed, or
$GOLDEN_VENV). Everything runs in float32 on the CPU with the eager attention implementation.

For each model it writes tests/golden/families/<name>/:
  config.json, model.safetensors  the checkpoint, as transformers saves it (save_pretrained);
  golden.json  for each of 8 prompts (token ids; for the encoder-decoders, the encoder's input):
               `greedy`, 16 greedy tokens (decoder-only: after the prompt; encoder-decoders:
               after the decoder start token) with the top-1/top-2 margin at each step, and
               `logits`, the teacher-forced top-20 (id, logit) at every position of
               prompt ++ greedy (decoder-only) or of the decoder input (encoder-decoders).
               Mistral's also holds `greedy_full_attention`: the same weights without the
               window, which must differ for a prompt longer than the window.
Weights are drawn from a fixed seed at a scale that gives clear margins (default inits give
near-uniform logits, where greedy comparisons test only ties). Tests never run this.
"""

import json
import os
import sys

from golden_venv import PINS, ensure

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "families")
VOCAB = 384
PROMPTS = 8
GREEDY = 16
TOP_K = 20
SEED = 20261205


def prompts(rng, min_len, max_len, vocab, avoid):
    """8 prompts of random ids (lengths spread over [min_len, max_len]) avoiding `avoid` ids."""
    out = []
    for i in range(PROMPTS):
        n = min_len + (max_len - min_len) * i // (PROMPTS - 1)
        ids = []
        while len(ids) < n:
            t = int(rng.integers(0, vocab))
            if t not in avoid:
                ids.append(t)
        out.append(ids)
    return out


def scale_weights(model, torch, seed):
    """Redraws every parameter: matrices N(0, 1/fan_in) (embeddings N(0, 1)), norm scales
    1 + N(0, 0.1²), biases N(0, 0.1²), T5's relative position biases N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                embedding = "embed" in name or "wte" in name or "wpe" in name or "shared" in name \
                    or "relative_attention_bias" in name
                std = 1.0 if embedding else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name or "ln_" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def top(logits, k=TOP_K):
    vals, ids = logits.topk(k)
    return {"ids": ids.tolist(), "logits": [round(float(v), 6) for v in vals]}


def decoder_only(torch, model, prompt):
    """Greedy continuation (with margins) and teacher-forced top-k over prompt ++ greedy."""
    ids = list(prompt)
    greedy, margins = [], []
    with torch.no_grad():
        for _ in range(GREEDY):
            logits = model(torch.tensor([ids])).logits[0, -1]
            two = logits.topk(2)
            greedy.append(int(two.indices[0]))
            margins.append(round(float(two.values[0] - two.values[1]), 6))
            ids.append(greedy[-1])
        full = model(torch.tensor([ids[:-1]])).logits[0]
    return {
        "prompt": list(prompt),
        "greedy": greedy,
        "margins": margins,
        "logits": [top(row) for row in full],
    }


def encoder_decoder(torch, model, prompt, start):
    """Greedy decoding from `start` (with margins) and teacher-forced top-k of the decoder."""
    enc = torch.tensor([prompt])
    dec = [start]
    greedy, margins = [], []
    with torch.no_grad():
        for _ in range(GREEDY):
            logits = model(input_ids=enc, decoder_input_ids=torch.tensor([dec])).logits[0, -1]
            two = logits.topk(2)
            greedy.append(int(two.indices[0]))
            margins.append(round(float(two.values[0] - two.values[1]), 6))
            dec.append(greedy[-1])
        full = model(input_ids=enc, decoder_input_ids=torch.tensor([dec[:-1]])).logits[0]
    return {
        "prompt": list(prompt),
        "decoder_start": start,
        "greedy": greedy,
        "margins": margins,
        "logits": [top(row) for row in full],
    }


def build(transformers, name):
    """The family's config and model class."""
    t = transformers
    common = {"vocab_size": VOCAB}
    if name == "gpt2":
        cfg = t.GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **common)
        return cfg, t.GPT2LMHeadModel
    if name == "mistral-window":
        cfg = t.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=256, sliding_window=16, rms_norm_eps=1e-5,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **common)
        return cfg, t.MistralForCausalLM
    if name in ("t5", "flan-t5"):
        flan = name == "flan-t5"
        cfg = t.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                         num_heads=4, relative_attention_num_buckets=32,
                         relative_attention_max_distance=64,
                         feed_forward_proj="gated-gelu" if flan else "relu",
                         tie_word_embeddings=not flan, dropout_rate=0.0,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **common)
        return cfg, t.T5ForConditionalGeneration
    if name == "marian":
        cfg = t.MarianConfig(d_model=64, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4,
                             encoder_ffn_dim=128, decoder_ffn_dim=128,
                             max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, pad_token_id=VOCAB - 1, eos_token_id=0,
                             decoder_start_token_id=VOCAB - 1, scale_embedding=True,
                             share_encoder_decoder_embeddings=True, **common)
        return cfg, t.MarianMTModel
    raise ValueError(name)


def main():
    ensure(__file__)
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    families = ["gpt2", "mistral-window", "t5", "flan-t5", "marian"]
    for k, name in enumerate(families):
        cfg, cls = build(transformers, name)
        cfg._attn_implementation = "eager"
        model = cls(cfg).eval()
        scale_weights(model, torch, SEED + k)
        rng = np.random.default_rng(SEED + k)
        special = {0, 1, 2, VOCAB - 1}
        if name == "mistral-window":
            cases = prompts(rng, 20, 48, VOCAB, special)  # all longer than the window (16)
        else:
            cases = prompts(rng, 3, 40, VOCAB, special)
        out_dir = os.path.join(OUT, name)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        if cfg.is_encoder_decoder:
            start = cfg.decoder_start_token_id
            goldens = [encoder_decoder(torch, model, p, start) for p in cases]
        else:
            goldens = [decoder_only(torch, model, p) for p in cases]
        doc = {
            "family": name,
            "versions": {k2: v for k2, v in PINS.items() if k2 in ("torch", "transformers")},
            "seed": SEED + k,
            "attn_implementation": "eager",
            "dtype": "float32",
            "cases": goldens,
        }
        if name == "mistral-window":
            full_cfg, _ = build(transformers, name)
            full_cfg.sliding_window = None
            full_cfg._attn_implementation = "eager"
            full = cls(full_cfg).eval()
            full.load_state_dict(model.state_dict())
            doc["greedy_full_attention"] = [decoder_only(torch, full, p)["greedy"] for p in cases]
            differ = sum(a != g["greedy"] for a, g in zip(doc["greedy_full_attention"], goldens))
            doc["window_changes_greedy_of"] = differ
            print(f"mistral-window: the window changes the greedy output of {differ}/8 prompts",
                  file=sys.stderr)
        with open(os.path.join(out_dir, "golden.json"), "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        worst = min(min(g["margins"]) for g in goldens)
        print(f"wrote {out_dir}: smallest greedy margin {worst:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
