"""Eager PyTorch implementation of Llama-2 + HiCI (docs: spec sections 3-4), for benchmarks.

The same math as the Rust model (crates/hici-model): RMSNorm, RoPE with linear position
interpolation, SwiGLU MLP, LocalConstructorMulti, GlobalIntegratorShared, the top-down
broadcast prefix [G ; L_n] with the bottom-right causal mask, and the Mode-I decode cache
[G ; L ; tokens] (slots in their true order). Written the way a PyTorch user would: nn-free
F.linear on [out, in] weights, F.scaled_dot_product_attention, a RoPE table built once,
torch.cat for the KV cache (what HF's DynamicCache does).

`check_fixture()` runs it on the repository's tiny fixture and compares with the expected
logits, so the benchmark compares the same computation.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F


class Config:
    """The `ModelConfig` JSON layout that `hici bench --synthetic FILE` reads."""

    def __init__(self, d: dict):
        llama = d.get("llama", d)
        self.hidden = llama["hidden_size"]
        self.inter = llama["intermediate_size"]
        self.layers = llama["num_hidden_layers"]
        self.heads = llama["num_attention_heads"]
        self.kv_heads = llama.get("num_key_value_heads") or self.heads
        self.vocab = llama["vocab_size"]
        self.eps = llama.get("rms_norm_eps", 1e-5)
        self.theta = llama.get("rope_theta", 10000.0)
        self.max_pos = llama["max_position_embeddings"]
        rs = llama.get("rope_scaling")
        self.rope_factor = d.get("rope_factor") or (rs["factor"] if rs else 1.0)
        self.head_dim = self.hidden // self.heads
        h = d.get("hici")
        self.hici = h
        if h:
            self.M = h["local_slots"]
            self.K = h["global_slots"]
            self.hc = h["lc_heads"]
            self.hg = h["gi_heads"]
            self.Bd = h["bottleneck_dim"]
            self.Cd = h["compress_dim"]
            self.Sd = h["shared_compress_dim"]

    @staticmethod
    def load(path: str | Path) -> "Config":
        return Config(json.loads(Path(path).read_text()))


def random_weights(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the HF names, scaled like `hici bench --synthetic` (std 1/sqrt(in))."""
    g = torch.Generator().manual_seed(seed)
    w: dict[str, torch.Tensor] = {}

    def lin(name, out, inp):
        w[name] = (torch.rand(out, inp, generator=g) * 2 - 1) * math.sqrt(3.0 / inp)

    def std1(name, *shape):
        w[name] = (torch.rand(*shape, generator=g) * 2 - 1) * math.sqrt(3.0)

    H, hd = cfg.hidden, cfg.head_dim
    std1("model.embed_tokens.weight", cfg.vocab, H)
    for i in range(cfg.layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = torch.ones(H)
        w[f"{p}.post_attention_layernorm.weight"] = torch.ones(H)
        lin(f"{p}.self_attn.q_proj.weight", cfg.heads * hd, H)
        lin(f"{p}.self_attn.k_proj.weight", cfg.kv_heads * hd, H)
        lin(f"{p}.self_attn.v_proj.weight", cfg.kv_heads * hd, H)
        lin(f"{p}.self_attn.o_proj.weight", H, cfg.heads * hd)
        lin(f"{p}.mlp.gate_proj.weight", cfg.inter, H)
        lin(f"{p}.mlp.up_proj.weight", cfg.inter, H)
        lin(f"{p}.mlp.down_proj.weight", H, cfg.inter)
        if cfg.hici:
            lc = f"{p}.self_attn.local_constructor"
            std1(f"{lc}.memory_slots", cfg.M, H)
            for n in ("q_proj", "k_proj", "v_proj"):
                lin(f"{lc}.{n}.weight", cfg.Bd, H)
            lin(f"{lc}.o_proj.weight", H, cfg.Bd)
            gi = f"{p}.self_attn.global_integrator"
            lin(f"{gi}.shared_compressor.0.weight", cfg.Sd, H)
            w[f"{gi}.shared_compressor.1.weight"] = torch.ones(cfg.Sd)
            w[f"{gi}.shared_compressor.1.bias"] = torch.zeros(cfg.Sd)
            if cfg.Sd < cfg.Cd:
                lin(f"{gi}.stat_expand.0.weight", cfg.Cd, cfg.Sd)
                w[f"{gi}.stat_expand.1.weight"] = torch.ones(cfg.Cd)
                w[f"{gi}.stat_expand.1.bias"] = torch.zeros(cfg.Cd)
            std1(f"{gi}.global_queries", cfg.K, cfg.Cd)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin(f"{gi}.{n}.weight", cfg.Cd, cfg.Cd)
            lin(f"{gi}.expand.weight", H, cfg.Cd)
            w[f"{gi}.expand_scale_param"] = torch.zeros(())
    w["model.norm.weight"] = torch.ones(H)
    lin("lm_head.weight", cfg.vocab, H)
    return w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Cache:
    """Per-layer K/V `[1, nkv, len, hd]` plus the next RoPE position (slots take none)."""

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.pos = 0


class TorchHici:
    def __init__(self, cfg: Config, w: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = w
        self.L = [
            {k[len(f"model.layers.{i}.") :]: v for k, v in w.items() if k.startswith(f"model.layers.{i}.")}
            for i in range(cfg.layers)
        ]
        hd = cfg.head_dim
        # transformers 4.34 LlamaLinearScalingRotaryEmbedding: a table built once, grown on demand
        self.inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, hd, 2).float() / hd))
        self._table_len = 0
        self._grow(cfg.max_pos * max(1, int(cfg.rope_factor)))

    def _grow(self, n):
        t = torch.arange(n, dtype=torch.float32) / self.cfg.rope_factor
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self._table_len = n

    def rope(self, x, pos0):
        """x: [n, heads, s, hd] at positions pos0.."""
        s = x.shape[2]
        if pos0 + s > self._table_len:
            self._grow(2 * (pos0 + s))
        cos, sin = self.cos[pos0 : pos0 + s], self.sin[pos0 : pos0 + s]
        return x * cos + rotate_half(x) * sin

    # --- building blocks ------------------------------------------------------------------
    def rms(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.cfg.eps))

    def mlp(self, lw, x):
        return F.linear(F.silu(F.linear(x, lw["mlp.gate_proj.weight"])) * F.linear(x, lw["mlp.up_proj.weight"]), lw["mlp.down_proj.weight"])

    def heads(self, x, n):
        b, s, _ = x.shape
        return x.view(b, s, n, self.cfg.head_dim).transpose(1, 2)

    def kv_repeat(self, x):
        rep = self.cfg.heads // self.cfg.kv_heads
        return x if rep == 1 else x.repeat_interleave(rep, dim=1)

    def local_constructor(self, lw, x):
        """x: [N, T, H] -> L: [N, M, H] (LocalConstructorMulti)."""
        c = self.cfg
        N, T, _ = x.shape
        p = "self_attn.local_constructor."
        dh = c.Bd // c.hc
        q = F.linear(lw[p + "memory_slots"], lw[p + "q_proj.weight"])  # [M, Bd]
        q = q.view(1, c.M, c.hc, dh).transpose(1, 2).expand(N, c.hc, c.M, dh)
        k = F.linear(x, lw[p + "k_proj.weight"]).view(N, T, c.hc, dh).transpose(1, 2)
        v = F.linear(x, lw[p + "v_proj.weight"]).view(N, T, c.hc, dh).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(N, c.M, c.Bd)
        return F.linear(o, lw[p + "o_proj.weight"])

    def global_integrator(self, lw, L):
        """L: [R, H] (all local slots of the sequence) -> G: [K, H] (GlobalIntegratorShared)."""
        c = self.cfg
        p = "self_attn.global_integrator."
        mean = L.mean(0)
        mx = L.max(0).values
        mn = L.min(0).values
        std = L.var(0, unbiased=False).sqrt().clamp_min(1e-6)
        nmean = F.normalize(mean, dim=0, eps=1e-6)
        S = torch.stack([mean, mx, mn, std, nmean])  # [5, H]
        C = F.layer_norm(F.linear(S, lw[p + "shared_compressor.0.weight"]), (c.Sd,), lw[p + "shared_compressor.1.weight"], lw[p + "shared_compressor.1.bias"])
        if c.Sd < c.Cd:
            C = F.layer_norm(F.linear(C, lw[p + "stat_expand.0.weight"]), (c.Cd,), lw[p + "stat_expand.1.weight"], lw[p + "stat_expand.1.bias"])
        dg = c.Cd // c.hg
        q = F.linear(lw[p + "global_queries"], lw[p + "q_proj.weight"]).view(c.K, c.hg, dg).transpose(0, 1)
        k = F.linear(C, lw[p + "k_proj.weight"]).view(5, c.hg, dg).transpose(0, 1)
        v = F.linear(C, lw[p + "v_proj.weight"]).view(5, c.hg, dg).transpose(0, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) * dg**-0.5, dim=-1)
        o = (a @ v).transpose(0, 1).reshape(c.K, c.Cd)
        o = F.linear(o, lw[p + "o_proj.weight"])
        return F.linear(o, lw[p + "expand.weight"]) * F.softplus(lw[p + "expand_scale_param"])

    # --- attention ------------------------------------------------------------------------
    def attn_full(self, lw, a, cache: Cache | None):
        c = self.cfg
        q = self.rope(self.heads(F.linear(a, lw["self_attn.q_proj.weight"]), c.heads), 0)
        k = self.rope(self.heads(F.linear(a, lw["self_attn.k_proj.weight"]), c.kv_heads), 0)
        v = self.heads(F.linear(a, lw["self_attn.v_proj.weight"]), c.kv_heads)
        if cache is not None:
            cache.k.append(k)
            cache.v.append(v)
        o = F.scaled_dot_product_attention(q, self.kv_repeat(k), self.kv_repeat(v), is_causal=True)
        b, _, s, _ = o.shape
        return F.linear(o.transpose(1, 2).reshape(b, s, -1), lw["self_attn.o_proj.weight"])

    def attn_hici(self, lw, a, n_seg, cache: Cache | None):
        """a: [1, S, H] cut into n_seg segments; Mode I when n_seg == 1."""
        c = self.cfg
        _, S, H = a.shape
        T = S // n_seg
        seg = a.view(n_seg, T, H)
        Lc = self.local_constructor(lw, seg)  # [N, M, H]
        G = self.global_integrator(lw, Lc.reshape(n_seg * c.M, H))  # [K, H]
        prefix = torch.cat([G.unsqueeze(0).expand(n_seg, c.K, H), Lc], dim=1)  # [N, p, H]
        pk = self.heads(F.linear(prefix, lw["self_attn.k_proj.weight"]), c.kv_heads)
        pv = self.heads(F.linear(prefix, lw["self_attn.v_proj.weight"]), c.kv_heads)
        # token projections with RoPE at global positions n*T + i
        q = self.rope(self.heads(F.linear(a, lw["self_attn.q_proj.weight"]), c.heads), 0)
        tk = self.rope(self.heads(F.linear(a, lw["self_attn.k_proj.weight"]), c.kv_heads), 0)
        tv = self.heads(F.linear(a, lw["self_attn.v_proj.weight"]), c.kv_heads)
        # [1, h, S, hd] -> [N, h, T, hd]
        split = lambda x: x.reshape(x.shape[1], n_seg, T, c.head_dim).transpose(0, 1)
        qs, tks, tvs = split(q), split(tk), split(tv)
        keys = torch.cat([pk, tks], dim=2)
        vals = torch.cat([pv, tvs], dim=2)
        p = c.K + c.M
        i = torch.arange(T).unsqueeze(1)
        j = torch.arange(p + T).unsqueeze(0)
        allowed = (j < p) | (j - p <= i)  # bottom-right causal with an always-visible prefix
        o = F.scaled_dot_product_attention(qs, self.kv_repeat(keys), self.kv_repeat(vals), attn_mask=allowed)
        o = o.transpose(1, 2).reshape(1, S, -1)  # segment-major = sequence order
        if cache is not None:
            cache.k.append(keys)
            cache.v.append(vals)
        return F.linear(o, lw["self_attn.o_proj.weight"])

    def attn_decode(self, lw, x, i, cache: Cache):
        c = self.cfg
        q = self.rope(self.heads(F.linear(x, lw["self_attn.q_proj.weight"]), c.heads), cache.pos)
        k = self.rope(self.heads(F.linear(x, lw["self_attn.k_proj.weight"]), c.kv_heads), cache.pos)
        v = self.heads(F.linear(x, lw["self_attn.v_proj.weight"]), c.kv_heads)
        cache.k[i] = torch.cat([cache.k[i], k], dim=2)
        cache.v[i] = torch.cat([cache.v[i], v], dim=2)
        o = F.scaled_dot_product_attention(q, self.kv_repeat(cache.k[i]), self.kv_repeat(cache.v[i]))
        return F.linear(o.transpose(1, 2).reshape(1, 1, -1), lw["self_attn.o_proj.weight"])

    # --- the model ------------------------------------------------------------------------
    def head(self, x):
        return F.linear(self.rms(x, self.w["model.norm.weight"]), self.w["lm_head.weight"])

    def prefill(self, ids, mode="full", segments=4, last_only=True, keep_cache=True):
        """ids: [1, S] -> (logits, cache). mode: full | hici (Mode I) | hici-segmented."""
        x = F.embedding(ids, self.w["model.embed_tokens.weight"])
        cache = Cache() if keep_cache and mode in ("full", "hici") else None
        for lw in self.L:
            a = self.rms(x, lw["input_layernorm.weight"])
            if mode == "full":
                o = self.attn_full(lw, a, cache)
            elif mode == "hici":
                o = self.attn_hici(lw, a, 1, cache)
            elif mode == "hici-segmented":
                o = self.attn_hici(lw, a, segments, None)
            else:
                raise ValueError(mode)
            x = x + o
            x = x + self.mlp(lw, self.rms(x, lw["post_attention_layernorm.weight"]))
        if cache is not None:
            cache.pos = ids.shape[1]
        if last_only:
            x = x[:, -1:]
        return self.head(x), cache

    def decode(self, ids, cache: Cache):
        """ids: [1, 1] -> logits [1, 1, V]; appends to the cache."""
        x = F.embedding(ids, self.w["model.embed_tokens.weight"])
        for i, lw in enumerate(self.L):
            a = self.rms(x, lw["input_layernorm.weight"])
            x = x + self.attn_decode(lw, a, i, cache)
            x = x + self.mlp(lw, self.rms(x, lw["post_attention_layernorm.weight"]))
        cache.pos += ids.shape[1]
        return self.head(x)


# --- fixture check ------------------------------------------------------------------------

_DT = {"F32": torch.float32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        buf = bytearray(raw[base + a : base + b])
        t = torch.frombuffer(buf, dtype=_DT[meta["dtype"]]) if b > a else torch.empty(0, dtype=_DT[meta["dtype"]])
        out[k] = t.reshape(meta["shape"]).clone()
    return out


def fixture_model(root: Path) -> TorchHici:
    """The tiny-hici-a fixture: base + trainable_params.bin + merged LoRA (alpha/r)."""
    man = json.loads((root / "expected/manifest.json").read_text())
    hc = man["hici_config"]
    d = {
        "llama": man["model_config"],
        "hici": {
            "local_slots": hc["num_local_slots"],
            "global_slots": hc["global_slots"],
            "lc_heads": hc["num_heads"],
            "gi_heads": hc["global_integrator_num_heads"],
            "bottleneck_dim": hc["bottleneck_dim"],
            "compress_dim": hc["global_integrator_compress_dim"],
            "shared_compress_dim": hc["shared_compress_dim"],
        },
    }
    cfg = Config(d)
    w: dict[str, torch.Tensor] = {}
    for f in sorted((root / "base").glob("*.safetensors")):
        w.update(read_safetensors(f))
    w.update(torch.load(root / "adapter/trainable_params.bin", map_location="cpu", weights_only=True))
    ad = json.loads((root / "adapter/adapter_config.json").read_text())
    scale = ad["lora_alpha"] / ad["r"]
    lora = torch.load(root / "adapter/adapter_model.bin", map_location="cpu", weights_only=True)
    for k, A in lora.items():
        if ".lora_A." not in k:
            continue
        B = lora[k.replace(".lora_A.", ".lora_B.")]
        name = k.removeprefix("base_model.model.").replace(".lora_A.", ".")
        w[name] = w[name] + scale * (B @ A)
    w = {k: v.float() for k, v in w.items()}
    return TorchHici(cfg, w)


def check_fixture(root: Path) -> dict:
    """Max |diff| of this implementation against the fixture's expected logits."""
    m = fixture_model(root)
    ex = root / "expected"
    inputs = read_safetensors(ex / "inputs.safetensors")
    out = {}
    with torch.inference_mode():
        full = read_safetensors(ex / "full_logits.safetensors")["logits"]
        got, _ = m.prefill(inputs["long_ids"].view(1, -1), "full", last_only=False, keep_cache=False)
        out["full"] = (got[0] - full).abs().max().item()
        seg = read_safetensors(ex / "segmented_logits.safetensors")["logits"]
        got, _ = m.prefill(inputs["long_ids"].view(1, -1), "hici-segmented", 4, last_only=False)
        out["hici-segmented"] = (got[0] - seg).abs().max().item()
        pre = read_safetensors(ex / "prefill_logits.safetensors")
        dec = read_safetensors(ex / "greedy_decode_unscrambled_cache_NONREFERENCE.safetensors")
        worst_pre, worst_dec, ids_ok = 0.0, 0.0, True
        for p in ("prompt1", "prompt2"):
            ids = inputs[f"{p}_ids"].view(1, -1)
            got, cache = m.prefill(ids, "hici", last_only=False)
            worst_pre = max(worst_pre, (got[0] - pre[p]).abs().max().item())
            steps = [got[0, -1]]
            toks = []
            nxt = int(got[0, -1].argmax())
            for _ in range(dec[f"{p}_generated_ids"].numel()):
                toks.append(nxt)
                lg = m.decode(torch.tensor([[nxt]]), cache)
                steps.append(lg[0, 0])
                nxt = int(lg[0, 0].argmax())
            want = dec[f"{p}_step_logits"]
            worst_dec = max(worst_dec, (torch.stack(steps[: want.shape[0]]) - want).abs().max().item())
            ids_ok &= toks == dec[f"{p}_generated_ids"].tolist()
        out["hici"] = worst_pre
        out["hici-decode"] = worst_dec
        out["greedy_ids_equal"] = ids_ok
    return out
