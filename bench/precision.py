"""How far half precision moves the tiny fixture's logits, measured with PyTorch.

Independent evidence for the f16/bf16 tolerances of `hici parity` (docs/precision.md): the
eager implementation of bench/hici_torch.py (checked against the fixture in f32 first) is run
with its weights and activations in f16 or bf16, while RMSNorm, softmax/attention, the
GlobalIntegrator statistics and the logits are computed in f32, the same split as the Rust
model's `with_dtype`. Prints the max |diff| against the reference's f32 logits for Mode I
prefill, Mode F, Mode T and 16 teacher-forced decode steps (and the RMS of the difference), plus
how many greedy argmaxes change, as JSON.

    python bench/precision.py            # needs torch (CPU is enough)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import hici_torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/tiny-hici-a"


class HalfHici(hici_torch.TorchHici):
    """Weights and activations in `dt`; RMSNorm, token attention and logits in f32. The
    LocalConstructor/GlobalIntegrator run in `dt` through PyTorch's CPU kernels, whose softmax,
    layer_norm and reductions (the GI statistics) accumulate in f32, as the Rust model does."""

    def __init__(self, base: hici_torch.TorchHici, dt: torch.dtype):
        super().__init__(base.cfg, {k: v.to(dt) for k, v in base.w.items()})
        self.dt = dt

    def rope(self, x, pos0):
        return super().rope(x.float(), pos0).to(self.dt)

    def rms(self, x, w):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (w.float() * (x.float() * torch.rsqrt(var + self.cfg.eps))).to(self.dt)

    def head(self, x):
        return super().head(x).float()


def _sdpa_f32(q, k, v, attn_mask=None, is_causal=False):
    return _SDPA(q.float(), k.float(), v.float(), attn_mask=attn_mask, is_causal=is_causal).to(q.dtype)


_SDPA = F.scaled_dot_product_attention


def diff(got: torch.Tensor, want: torch.Tensor) -> dict:
    d = got.float() - want
    return {"max_abs": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item()}


def measure(m: hici_torch.TorchHici) -> dict:
    ex = FIXTURE / "expected"
    rd = hici_torch.read_safetensors
    inputs = rd(ex / "inputs.safetensors")
    out = {}
    F.scaled_dot_product_attention = _sdpa_f32
    try:
        with torch.inference_mode():
            long_ids = inputs["long_ids"].view(1, -1)
            got, _ = m.prefill(long_ids, "full", last_only=False, keep_cache=False)
            out["mode_f"] = diff(got[0], rd(ex / "full_logits.safetensors")["logits"])
            got, _ = m.prefill(long_ids, "hici-segmented", 4, last_only=False)
            out["mode_t"] = diff(got[0], rd(ex / "segmented_logits.safetensors")["logits"])
            pre = rd(ex / "prefill_logits.safetensors")
            dec = rd(ex / "greedy_decode_unscrambled_cache_NONREFERENCE.safetensors")
            out["argmax_changed"] = 0
            for p in ("prompt1", "prompt2"):
                ids = inputs[f"{p}_ids"].view(1, -1)
                got, cache = m.prefill(ids, "hici", last_only=False)
                out[f"mode_i_prefill_{p}"] = diff(got[0], pre[p])
                want_ids = dec[f"{p}_generated_ids"].tolist()
                rows = [got[0, -1].float()]
                for nxt in want_ids[:-1]:  # teacher-forced on the reference's ids
                    rows.append(m.decode(torch.tensor([[nxt]]), cache)[0, 0].float())
                rows = torch.stack(rows)
                want = dec[f"{p}_step_logits"][: rows.shape[0]]
                out[f"decode_16_forced_{p}"] = diff(rows, want)
                out["argmax_changed"] += int((rows.argmax(-1) != torch.tensor(want_ids)).sum())
    finally:
        F.scaled_dot_product_attention = _SDPA
    return out


def main():
    torch.manual_seed(0)
    base = hici_torch.fixture_model(FIXTURE)
    res = {"torch": torch.__version__, "f32": measure(base)}
    for name, dt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        res[name] = measure(HalfHici(base, dt))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
