#!/usr/bin/env python3
"""Side-by-side CPU benchmark: `hici bench` vs an eager PyTorch implementation of the same math.

One run does, in order:
  1. checks the PyTorch implementation (bench/hici_torch.py) against the repository's fixture
     logits (modes full, hici, hici-segmented and the hici decode), so both sides compute the
     same thing;
  2. for each prompt length in turn (interleaved, so background load hits both sides alike):
     `hici bench --synthetic CONFIG --modes full,hici --prompt-len P --json` with
     RAYON_NUM_THREADS and MATMUL_NUM_THREADS set to --threads, then the same protocol in
     PyTorch (torch.set_num_threads(--threads)): per row --warmup untimed + --iters timed runs
     of [prefill P random tokens, last-position logits, greedy first token; --gen-len greedy
     single-token decode steps with a KV cache];
  3. before every step waits (up to --wait-quiet s) until no other process uses the CPU, and
     records the 1-minute load average around every step;
  4. prints a Markdown table of tokens/s and the ratios ours / torch, and writes everything to
     --out as JSON.

Needs a Python with torch (CPU wheel from PyPI is enough); the `hici` binary must be built
(cargo build --release --features wgpu,cuda).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hici_torch  # noqa: E402
from quiet import loadavg, wait_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent



def stats(xs):
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)} if xs else None


def run_hici(args, lens: str) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), MATMUL_NUM_THREADS=str(args.threads))
    rel = lambda p: os.path.relpath(Path(p).resolve(), ROOT)
    cmd = [
        rel(args.hici), "bench", "--synthetic", rel(args.config),
        "--prompt-len", lens, "--gen-len", str(args.gen_len),
        "--modes", args.modes, "--warmup", str(args.warmup), "--iters", str(args.iters),
        "--seed", str(args.seed), "--json",
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    if not cmd[0].startswith(("/", ".")):
        cmd[0] = "./" + cmd[0]
    r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, check=True)
    return json.loads(r.stdout)


def run_torch(args, model, lens: list[int]) -> list:
    cfg = model.cfg
    rows = []
    for mode in args.modes.split(","):
        for p in lens:
            print(f"torch: {mode} prompt {p}: {args.warmup} warmup + {args.iters} timed", file=sys.stderr)
            g = torch.Generator().manual_seed(args.seed + p)
            pre, ttft, dec = [], [], []
            for it in range(args.warmup + args.iters):
                ids = torch.randint(3, cfg.vocab, (1, p), generator=g)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    logits, cache = model.prefill(ids, mode)
                    t_pre = time.perf_counter() - t0
                    nxt = int(logits[0, -1].argmax())
                    t_ttft = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    for _ in range(args.gen_len):
                        lg = model.decode(torch.tensor([[nxt]]), cache)
                        nxt = int(lg[0, -1].argmax())
                    t_dec = time.perf_counter() - t1
                if it >= args.warmup:
                    pre.append(t_pre)
                    ttft.append(t_ttft)
                    dec.append(t_dec)
            rows.append({
                "mode": mode,
                "prompt_len": p,
                "gen_len": args.gen_len,
                "prefill": {"tokens_per_s": stats([p / t for t in pre]), "seconds": stats(pre), "samples_s": pre},
                "ttft_ms": stats([t * 1e3 for t in ttft]),
                "decode": {"tokens_per_s": stats([args.gen_len / t for t in dec]), "samples_s": dec} if args.gen_len else None,
            })
    return rows


def table(ours: dict, theirs: dict) -> tuple[str, list]:
    by = {(r["mode"], r["prompt_len"]): r for r in theirs["results"]}
    lines = [
        "| mode | prompt | prefill tok/s ours | prefill tok/s torch | prefill ours/torch "
        "| decode tok/s ours | decode tok/s torch | decode ours/torch | TTFT ms ours | TTFT ms torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for r in ours["results"]:
        t = by.get((r["mode"], r["prompt_len"]))
        if t is None:
            continue
        po, pt = r["prefill"]["tokens_per_s"]["mean"], t["prefill"]["tokens_per_s"]["mean"]
        do = r["decode"]["tokens_per_s"]["mean"] if r["decode"] else None
        dt = t["decode"]["tokens_per_s"]["mean"] if t["decode"] else None
        dr = do / dt if do and dt else None
        best = lambda x: x["tokens_per_s"]["max"] if x else None
        bdo, bdt = best(r["decode"]), best(t["decode"])
        ratios.append({
            "mode": r["mode"], "prompt_len": r["prompt_len"],
            "prefill_ratio_mean": po / pt, "decode_ratio_mean": dr,
            "prefill_ratio_best": best(r["prefill"]) / best(t["prefill"]),
            "decode_ratio_best": bdo / bdt if bdo and bdt else None,
        })
        f = lambda x, n=1: "-" if x is None else f"{x:.{n}f}"
        lines.append(
            f"| {r['mode']} | {r['prompt_len']} | {po:.1f} | {pt:.1f} | **{po / pt:.2f}** "
            f"| {f(do)} | {f(dt)} | **{f(dr, 2)}** "
            f"| {f(r['ttft_ms']['mean'] if r['ttft_ms'] else None, 0)} | {f(t['ttft_ms']['mean'], 0)} |"
        )
    return "\n".join(lines), ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hici", type=Path, default=ROOT / "target/release/hici")
    ap.add_argument("--config", type=Path, default=ROOT / "bench/configs/cpu-512x8.json")
    ap.add_argument("--lens", default="512,1024,2048,4096")
    ap.add_argument("--modes", default="full,hici")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-quiet", type=float, default=900,
                    help="before each step wait up to this many seconds until no other process is busy (0: off)")
    ap.add_argument("--skip-check", action="store_true", help="skip the fixture check of the torch implementation")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/compare-cpu.json")
    args = ap.parse_args()

    check = None
    if not args.skip_check:
        check = hici_torch.check_fixture(ROOT / "tests/fixtures/tiny-hici-a")
        print(f"torch implementation vs fixture (max |diff| of logits): {check}", file=sys.stderr)
        bad = [k for k, v in check.items() if (v is False) or (isinstance(v, float) and v > 1e-3)]
        if bad:
            sys.exit(f"the torch implementation does not match the fixture: {bad}")

    # Interleaved per prompt length (hici, then torch) so that any background load on the
    # machine hits both sides alike; the 1-minute load average is recorded around each step.
    torch.set_num_threads(args.threads)
    cfg = hici_torch.Config.load(args.config)
    t0 = time.perf_counter()
    model = hici_torch.TorchHici(cfg, hici_torch.random_weights(cfg, args.seed))
    torch_load_s = time.perf_counter() - t0
    ours, theirs_rows, loads = None, [], []
    for p in args.lens.split(","):
        q0 = wait_quiet(args.wait_quiet)
        l0 = loadavg()
        doc = run_hici(args, p)
        l1 = loadavg()
        q1 = wait_quiet(args.wait_quiet)
        theirs_rows += run_torch(args, model, [int(p)])
        loads.append({
            "prompt_len": int(p), "before": l0, "after_hici": l1, "after_torch": loadavg(),
            "quiet_before_hici": q0, "quiet_before_torch": q1,
        })
        if ours is None:
            ours = doc
        else:
            ours["results"] += doc["results"]
    ours["results"].sort(key=lambda r: (args.modes.split(",").index(r["mode"]), r["prompt_len"]))
    ours["settings"]["prompt_lens"] = [int(x) for x in args.lens.split(",")]
    theirs = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_s": torch_load_s,
        "results": theirs_rows,
    }
    md, ratios = table(ours, theirs)
    doc = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "threads": args.threads,
        "config": json.loads(args.config.read_text()),
        "fixture_check_max_abs_diff": check,
        "loadavg_1min": loads,
        "hici": ours,
        "torch": theirs,
        "ratios_ours_over_torch": ratios,
        "markdown": md,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(md)
    print(f"\nwritten {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
