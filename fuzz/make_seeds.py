#!/usr/bin/env python3
"""Writes the small seed inputs of the fuzz targets (committed under fuzz/seeds/; standard
library only):

  seeds/safetensors/  valid safetensors files: f32/f16/bf16/f64 tensors, a 0-dim tensor,
                      metadata, an empty file body
  seeds/converted/    a minimal valid `hici import` file (1-layer toy config, bf16 and f32)

The `.bin` target is seeded with crates/hici-io/tests/corpus/ (torch.save files, including the
malicious and damaged ones).

    python fuzz/make_seeds.py
"""

import json
import random
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pack(dtype, values):
    if dtype == "F32":
        return b"".join(struct.pack("<f", v) for v in values)
    if dtype == "F64":
        return b"".join(struct.pack("<d", v) for v in values)
    if dtype == "F16":
        return b"".join(struct.pack("<e", v) for v in values)
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in values)
    raise ValueError(dtype)


def safetensors(path, tensors, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, values in tensors:
        raw = pack(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def vals(rng, n):
    return [round(rng.uniform(-1, 1), 3) for _ in range(n)]


def main():
    rng = random.Random(0)
    st = HERE / "seeds" / "safetensors"
    safetensors(st / "f32.safetensors", [("model.norm.weight", "F32", [4], vals(rng, 4)),
                                         ("w", "F32", [2, 3], vals(rng, 6))])
    safetensors(st / "half.safetensors", [("a", "F16", [3], vals(rng, 3)),
                                          ("b", "BF16", [2, 2], vals(rng, 4)),
                                          ("c", "F64", [1], vals(rng, 1))])
    safetensors(st / "scalar-meta.safetensors", [("s", "F32", [], [0.75])],
                metadata={"format": "pt"})
    safetensors(st / "empty.safetensors", [])

    # A complete toy model: hidden 8, 2 heads, 1 layer, intermediate 16, vocab 8.
    h, inter, v = 8, 16, 8
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h],
              "lm_head.weight": [v, h]}
    p = "model.layers.0."
    for n in "qkvo":
        shapes[f"{p}self_attn.{n}_proj.weight"] = [h, h]
    shapes[f"{p}mlp.gate_proj.weight"] = [inter, h]
    shapes[f"{p}mlp.up_proj.weight"] = [inter, h]
    shapes[f"{p}mlp.down_proj.weight"] = [h, inter]
    shapes[f"{p}input_layernorm.weight"] = [h]
    shapes[f"{p}post_attention_layernorm.weight"] = [h]
    config = {"llama": {"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": v,
                        "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                        "max_position_embeddings": 64, "rope_scaling": None,
                        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
                        "attention_bias": False, "hidden_act": "silu"},
              "hici": None, "rope_factor": 1.0}
    for dtype in ["BF16", "F32"]:
        tensors = []
        for name, shape in sorted(shapes.items()):
            n = 1
            for d in shape:
                n *= d
            tensors.append((name, dtype, shape, vals(rng, n)))
        meta = {"format": "hici-converted", "format_version": "1",
                "config": json.dumps(config), "lora": "null", "merged_lora": "null",
                "lora_merged": "false", "dtype": dtype,
                "counts": json.dumps({"base": 0, "lora": 0, "hici": 0, "overrides": 0}),
                "notes": "[]"}
        safetensors(HERE / "seeds" / "converted" / f"toy-{dtype.lower()}.safetensors", tensors, meta)


if __name__ == "__main__":
    main()
