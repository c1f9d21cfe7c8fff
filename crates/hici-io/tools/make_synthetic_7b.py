#!/usr/bin/env python3
"""Writes a synthetic HiCI checkpoint with Llama-2-7B tensor names and widths, for memory and
speed measurements of the importer (random weights; nothing here is a real model).

Needs torch (CPU is enough; made with torch 2.4.0) and numpy (for Tensor.numpy). Output goes to --out, never
into the repository:

    python crates/hici-io/tools/make_synthetic_7b.py --out /some/scratch/dir --layers 2

Layout (as the released files, spec §2):
  base/      config.json (Llama-2-7B, num_hidden_layers = --layers), fp16 weights as
             `model-0000X-of-0000N.safetensors` shards + model.safetensors.index.json
             (--base-format safetensors, default) or `pytorch_model-...bin` shards + index
             with rotary_emb.inv_freq buffers (--base-format bin)
  adapter/   adapter_config.json (r 8, alpha 16), adapter_model.bin (bf16 LoRA on the 12
             projections of every layer: main attention, local_constructor, global_integrator),
             trainable_params.bin (f32 embedding with 32001 rows, all norms, all HiCI tensors;
             saved as views of one flat storage, as DeepSpeed's zero_to_fp32 output is)

With hidden 4096, intermediate 11008, vocab 32000 and 2 layers the base is ~1.3 GB (fp16),
trainable_params ~0.6 GB, the adapter ~1 MB.

--sparse writes the full 32-layer 7B layout as safetensors files whose data is a hole (all
zeros, no disk space; trainable_params.safetensors and adapter_model.safetensors instead of
.bin): for header-only checks such as `hici inspect --no-load`, which then prints the spec's
parameter counts ("matches spec").
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

H, I, V, NH = 4096, 11008, 32000, 32
M, K, BD, CD, SD, R = 8, 4, 512, 512, 128, 8


ADAPTER_CONFIG = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 16,
    "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "modules_to_save": None,
    "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
    "inference_mode": True, "base_model_name_or_path": "synthetic", "revision": None,
}

# LoRA on the 12 projections of every layer (spec §2.2): module -> (in, out).
LORA_TARGETS = {
    "self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H),
    "self_attn.v_proj": (H, H), "self_attn.o_proj": (H, H),
    "self_attn.local_constructor.q_proj": (H, BD),
    "self_attn.local_constructor.k_proj": (H, BD),
    "self_attn.local_constructor.v_proj": (H, BD),
    "self_attn.local_constructor.o_proj": (BD, H),
    "self_attn.global_integrator.q_proj": (CD, CD),
    "self_attn.global_integrator.k_proj": (CD, CD),
    "self_attn.global_integrator.v_proj": (CD, CD),
    "self_attn.global_integrator.o_proj": (CD, CD),
}


def config(layers):
    return {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": I,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": NH,
        "num_hidden_layers": layers,
        "num_key_value_heads": NH,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vocab_size": V,
    }


def rand(gen, *shape, std=0.02, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


def base_tensors(layers, gen):
    """Yields (name, fp16 tensor) in HF order."""
    yield "model.embed_tokens.weight", rand(gen, V, H, dtype=torch.float16)
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ["q", "k", "v", "o"]:
            yield p + f"self_attn.{n}_proj.weight", rand(gen, H, H, dtype=torch.float16)
        yield p + "mlp.gate_proj.weight", rand(gen, I, H, dtype=torch.float16)
        yield p + "mlp.up_proj.weight", rand(gen, I, H, dtype=torch.float16)
        yield p + "mlp.down_proj.weight", rand(gen, H, I, dtype=torch.float16)
        yield p + "input_layernorm.weight", torch.ones(H, dtype=torch.float16)
        yield p + "post_attention_layernorm.weight", torch.ones(H, dtype=torch.float16)
    yield "model.norm.weight", torch.ones(H, dtype=torch.float16)
    yield "lm_head.weight", rand(gen, V, H, dtype=torch.float16)


def write_safetensors(path, tensors):
    """Minimal safetensors writer (F16/F32/BF16), no extra dependency."""
    names = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    header, offset, blobs = {}, 0, []
    for k, t in tensors:
        t = t.contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def sparse_safetensors(path, dtype, tensors):
    """A safetensors file for (name, shape) pairs whose data section is a hole (zeros)."""
    elem = 4 if dtype == "F32" else 2
    header, off = {}, 0
    for k, shape in tensors:
        n = elem
        for d in shape:
            n *= d
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        f.truncate(8 + len(h) + off)


def make_sparse(out):
    """The full Llama-2-7B + HiCI layout, headers only (see --sparse)."""
    layers = 32
    gen = torch.Generator().manual_seed(0)
    (out / "base").mkdir(parents=True)
    (out / "adapter").mkdir(parents=True)
    (out / "base" / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
    shapes = []
    for k, t in base_tensors_shapes(layers):
        shapes.append((k, t))
    half = len(shapes) // 2
    weight_map = {}
    for i, part in enumerate([shapes[:half], shapes[half:]], 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        sparse_safetensors(out / "base" / name, "F16", part)
        weight_map.update({k: name for k, _ in part})
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "base" / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tp = [("model.embed_tokens.weight", (V + 1, H))]
    tp += [(k, tuple(t.shape)) for k, t in hici_tensors(layers, gen)]
    tp.append(("model.norm.weight", (H,)))
    sparse_safetensors(out / "adapter" / "trainable_params.safetensors", "F32", tp)
    lora = []
    for i in range(layers):
        for mod, (fin, fout) in LORA_TARGETS.items():
            p = f"base_model.model.model.layers.{i}.{mod}."
            lora += [(p + "lora_A.weight", (R, fin)), (p + "lora_B.weight", (fout, R))]
    sparse_safetensors(out / "adapter" / "adapter_model.safetensors", "BF16", lora)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=2) + "\n")
    print(f"{out}: sparse 7B layout ({len(shapes)} base, {len(tp)} trainable, {len(lora)} LoRA tensors)")


def base_tensors_shapes(layers):
    yield "model.embed_tokens.weight", (V, H)
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ["q", "k", "v", "o"]:
            yield p + f"self_attn.{n}_proj.weight", (H, H)
        yield p + "mlp.gate_proj.weight", (I, H)
        yield p + "mlp.up_proj.weight", (I, H)
        yield p + "mlp.down_proj.weight", (H, I)
        yield p + "input_layernorm.weight", (H,)
        yield p + "post_attention_layernorm.weight", (H,)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def make_base(out, layers, shards, fmt, gen):
    d = out / "base"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
    tensors = list(base_tensors(layers, gen))
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    per_shard = total / shards
    groups, cur, size = [], [], 0
    for k, t in tensors:
        cur.append((k, t))
        size += t.numel() * t.element_size()
        if size >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    n = len(groups)
    weight_map = {}
    for i, g in enumerate(groups, 1):
        if fmt == "safetensors":
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            write_safetensors(d / name, g)
        else:
            name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            sd = dict(g)
            layer = next((k.split(".")[2] for k, _ in g if k.startswith("model.layers.")), None)
            if layer is not None:
                hd = H // NH
                sd[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
                    10000.0 ** (torch.arange(0, hd, 2).float() / hd)
                )
            torch.save(sd, d / name)
            g = list(sd.items())
        for k, _ in g:
            weight_map[k] = name
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return total


def hici_tensors(layers, gen):
    for i in range(layers):
        lc = f"model.layers.{i}.self_attn.local_constructor."
        gi = f"model.layers.{i}.self_attn.global_integrator."
        yield f"model.layers.{i}.input_layernorm.weight", 1.0 + rand(gen, H)
        yield f"model.layers.{i}.post_attention_layernorm.weight", 1.0 + rand(gen, H)
        yield lc + "memory_slots", rand(gen, M, H)
        for n in ["q", "k", "v"]:
            yield lc + f"{n}_proj.weight", rand(gen, BD, H)
        yield lc + "o_proj.weight", rand(gen, H, BD)
        yield gi + "shared_compressor.0.weight", rand(gen, SD, H)
        yield gi + "shared_compressor.1.weight", 1.0 + rand(gen, SD)
        yield gi + "shared_compressor.1.bias", rand(gen, SD)
        yield gi + "stat_expand.0.weight", rand(gen, CD, SD)
        yield gi + "stat_expand.1.weight", 1.0 + rand(gen, CD)
        yield gi + "stat_expand.1.bias", rand(gen, CD)
        yield gi + "global_queries", rand(gen, K, CD)
        for n in ["q", "k", "v", "o"]:
            yield gi + f"{n}_proj.weight", rand(gen, CD, CD)
        yield gi + "expand.weight", rand(gen, H, CD)
        yield gi + "expand_scale_param", torch.tensor(0.1)


def make_adapter(out, layers, gen):
    d = out / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=2) + "\n")
    lora = {}
    for i in range(layers):
        for mod, (fin, fout) in LORA_TARGETS.items():
            p = f"base_model.model.model.layers.{i}.{mod}."
            lora[p + "lora_A.weight"] = rand(gen, R, fin, dtype=torch.bfloat16)
            lora[p + "lora_B.weight"] = rand(gen, fout, R, dtype=torch.bfloat16)
    torch.save(lora, d / "adapter_model.bin")

    # trainable_params.bin: every tensor a view of one flat f32 storage (zero_to_fp32 style).
    items = [("model.embed_tokens.weight", rand(gen, V + 1, H))]
    items += list(hici_tensors(layers, gen))
    items.append(("model.norm.weight", 1.0 + rand(gen, H)))
    flat = torch.empty(sum(t.numel() for _, t in items), dtype=torch.float32)
    sd, off = {}, 0
    for k, t in items:
        n = t.numel()
        flat[off : off + n] = t.reshape(-1)
        sd[k] = flat.narrow(0, off, n).view(t.shape)
        off += n
    torch.save(sd, d / "trainable_params.bin")
    return off * 4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--base-format", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--sparse", action="store_true", help="32-layer 7B layout, headers only")
    a = ap.parse_args()
    if a.out.exists():
        if not a.force:
            raise SystemExit(f"{a.out} exists (use --force)")
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    if a.sparse:
        make_sparse(a.out)
        return
    gen = torch.Generator().manual_seed(a.seed)
    base = make_base(a.out, a.layers, a.shards, a.base_format, gen)
    trainable = make_adapter(a.out, a.layers, gen)
    print(f"{a.out}: base {base / 1e9:.2f} GB fp16 ({a.base_format}), trainable_params {trainable / 1e9:.2f} GB f32")


if __name__ == "__main__":
    main()
