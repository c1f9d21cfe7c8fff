#!/usr/bin/env python3
"""Regenerates the PyTorch test corpus of hici-io from tests/fixtures/tiny-hici-a.

Needs torch (made with torch 2.4.0, CPU) and numpy. The generated files are committed; the Rust
tests only read them, so neither CI nor developers need torch.

    python crates/hici-io/tests/corpus/make_corpus.py

Files (all under crates/hici-io/tests/corpus/):
  base-bin-f16/      the fixture base as two f16 .bin shards + pytorch_model.bin.index.json,
                     with rotary_emb.inv_freq buffers (must be ignored)
  base-bin-bf16/     the fixture base as one bf16 pytorch_model.bin (an OrderedDict, like
                     model.state_dict())
  adapter-bf16/      the fixture adapter_model.bin in bf16 (the released adapter's dtype) +
                     adapter_config.json (tests add the fixture's trainable_params.bin)
  legacy.bin         pre-1.6 (non-zip) torch.save format: f32 tensors, a 0-dim tensor and a
                     view with a storage offset
  views.bin          zip format: a tensor and a view of it with a storage offset
  transposed.bin     zip format: a tensor and its transpose (non-contiguous view, same storage)
  nested.bin         zip format: tensors in a nested dict (keys `outer.full`, `outer.scalar`)
  small.bin          a small valid zip-format file (positive control for the two below)
  truncated.bin      the first half of small.bin
  corrupt_member.bin small.bin with bytes flipped inside a tensor's data member
  missing_member.bin small.bin without that tensor's data member (otherwise a valid zip)
  evil.bin           a state dict whose pickle calls os.system (posix.system) next to a tensor
  evil_toplevel.bin  a pickle whose top-level object calls os.system
  trainable-unknown-key/trainable_params.bin   a tensor named like an MLP weight
The os.system payload would create `hici_pwned_marker` in the working directory.
"""

import collections
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
FIXTURE = REPO / "tests" / "fixtures" / "tiny-hici-a"
MARKER_CMD = "touch hici_pwned_marker"


def read_safetensors(path):
    """Minimal safetensors reader (F32 only is needed for the fixture)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        assert info["dtype"] == "F32", (key, info["dtype"])
        s, e = info["data_offsets"]
        arr = np.frombuffer(data[s:e], dtype="<f4").reshape(info["shape"])
        out[key] = torch.from_numpy(arr.copy())
    return out


def fixture_base():
    index = json.loads((FIXTURE / "base" / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(read_safetensors(FIXTURE / "base" / shard))
    return tensors


def fresh_dir(name):
    d = HERE / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def inv_freq(config):
    hd = config["hidden_size"] // config["num_attention_heads"]
    return 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))


def make_bin_f16(base, config):
    d = fresh_dir("base-bin-f16")
    shutil.copyfile(FIXTURE / "base" / "config.json", d / "config.json")
    keys = sorted(base)
    layer0 = [k for k in keys if k.startswith("model.layers.0.")]
    shard1 = {k: base[k].half() for k in keys if k == "model.embed_tokens.weight" or k in layer0}
    shard1["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq(config)
    shard2 = {k: base[k].half() for k in keys if k not in shard1}
    shard2["model.layers.1.self_attn.rotary_emb.inv_freq"] = inv_freq(config)
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {}
    total = 0
    for name, shard in zip(names, [shard1, shard2]):
        torch.save(shard, d / name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_bin_bf16(base):
    d = fresh_dir("base-bin-bf16")
    shutil.copyfile(FIXTURE / "base" / "config.json", d / "config.json")
    sd = collections.OrderedDict((k, base[k].to(torch.bfloat16)) for k in sorted(base))
    torch.save(sd, d / "pytorch_model.bin")


def make_adapter_bf16():
    d = fresh_dir("adapter-bf16")
    src = FIXTURE / "adapter"
    shutil.copyfile(src / "adapter_config.json", d / "adapter_config.json")
    ad = torch.load(src / "adapter_model.bin", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in ad.items()}, d / "adapter_model.bin")


def make_small_and_broken():
    g = torch.Generator().manual_seed(0)
    small = {
        "model.norm.weight": torch.randn(64, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(64, generator=g),
    }
    torch.save(small, HERE / "small.bin")
    raw = (HERE / "small.bin").read_bytes()
    (HERE / "truncated.bin").write_bytes(raw[: len(raw) // 2])
    # Flip bytes in the middle of the first tensor's data member (CRC no longer matches).
    import zipfile

    with zipfile.ZipFile(HERE / "small.bin") as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 64)
    with open(HERE / "small.bin", "rb") as f:
        f.seek(info.header_offset + 26)
        name_len = int.from_bytes(f.read(2), "little")
        extra_len = int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + name_len + extra_len
    corrupt = bytearray(raw)
    for i in range(start + 16, start + 24):
        corrupt[i] ^= 0x5A
    (HERE / "corrupt_member.bin").write_bytes(bytes(corrupt))
    # The same archive without the first tensor's storage member.
    with zipfile.ZipFile(HERE / "small.bin") as src, zipfile.ZipFile(
        HERE / "missing_member.bin", "w", zipfile.ZIP_STORED
    ) as dst:
        for i in src.infolist():
            if i.filename != info.filename:
                dst.writestr(i, src.read(i.filename))


def make_legacy_and_views():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(6, 4, generator=g)
    legacy = {
        "full": big,
        "scalar": torch.tensor(0.75),
        "rows_2_to_4": big[2:4],
    }
    torch.save(legacy, HERE / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save({"full": big, "rows_2_to_4": big[2:4]}, HERE / "views.bin")
    torch.save({"full": big, "transposed": big.t()}, HERE / "transposed.bin")
    torch.save({"outer": {"full": big, "scalar": torch.tensor(0.75)}}, HERE / "nested.bin")


class Evil:
    def __reduce__(self):
        return (os.system, (MARKER_CMD,))


def make_evil():
    torch.save({"model.norm.weight": torch.ones(4), "payload": Evil()}, HERE / "evil.bin")
    torch.save(Evil(), HERE / "evil_toplevel.bin")


def make_trainable_unknown_key():
    d = fresh_dir("trainable-unknown-key")
    torch.save(
        {
            "model.norm.weight": torch.ones(64),
            "model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2),
        },
        d / "trainable_params.bin",
    )


def main():
    config = json.loads((FIXTURE / "base" / "config.json").read_text())
    base = fixture_base()
    make_bin_f16(base, config)
    make_bin_bf16(base)
    make_adapter_bf16()
    make_small_and_broken()
    make_legacy_and_views()
    make_evil()
    make_trainable_unknown_key()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"corpus written to {HERE} ({total} bytes)")


if __name__ == "__main__":
    main()
