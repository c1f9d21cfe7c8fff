#!/usr/bin/env python3
"""Side-by-side CPU benchmark: `hici bench` vs llama.cpp's `llama-bench` on the same GGUF files.

One run does, for each GGUF file given (e.g. an F32 and a Q8_0 file of the same weights) and
each test in turn, llama.cpp first, then hici (interleaved, so background load hits both alike):

  prefill P      llama-bench -p P -n 0              hici bench --prompt-len P --gen-len 0
  decode at D    llama-bench -p 0 -n G -d D         hici bench --prompt-len max(D,16) --gen-len G

(hici's decode starts after a prefill of the prompt, so its depth-0 row decodes after 16
tokens.) Both use --threads threads (llama-bench -t; hici through RAYON_NUM_THREADS and
MATMUL_NUM_THREADS). Before every step it waits until no other process uses the CPU
(bench/quiet.py). It prints a Markdown table of tokens/s and the ratios hici / llama.cpp
(above 1: hici is faster) and writes every raw result to --out as JSON.

llama.cpp is built from the source vendored in the PyPI sdist of llama-cpp-python (no other
download): see docs/benchmarks.md §8 for the exact commands. Same-weights files come from its
`llama-quantize --allow-requantize IN OUT F32|Q8_0`.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quiet import loadavg, wait_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent



def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_llama(args, model: Path, p: int, n: int, d: int) -> dict:
    cmd = [
        str(args.llama_bench), "-m", str(model), "-t", str(args.threads),
        "-p", str(p), "-n", str(n), "-d", str(d), "-r", str(args.iters), "-o", "json",
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, text=True)
    rows = json.loads(r.stdout)
    assert len(rows) == 1, rows
    row = rows[0]
    # the record names the binary, not where it was built
    shown = [Path(cmd[0]).name, *cmd[1:]]
    return {"cmd": shown, "tokens_per_s": row["avg_ts"], "stddev_ts": row["stddev_ts"], "raw": row}


def run_hici(args, model: Path, p: int, n: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), MATMUL_NUM_THREADS=str(args.threads))
    cmd = [
        str(args.hici), "bench", "--model", str(model), "--prompt-len", str(p), "--gen-len", str(n),
        "--warmup", str(args.warmup), "--iters", str(args.iters), "--json",
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True, text=True)
    doc = json.loads(r.stdout)
    row = doc["results"][0]
    part = row["decode"] if n > 0 else row["prefill"]
    return {
        "cmd": [os.path.relpath(cmd[0], ROOT), *cmd[1:]],
        "tokens_per_s": part["tokens_per_s"]["mean"],
        "min_max": [part["tokens_per_s"]["min"], part["tokens_per_s"]["max"]],
        "peak_rss_bytes": (row.get("memory") or {}).get("peak_rss_bytes"),
        "raw": doc,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hici", type=Path, default=ROOT / "target/release/hici")
    ap.add_argument("--llama-bench", type=Path, required=True, help="path of llama.cpp's llama-bench")
    ap.add_argument("--model", type=Path, action="append", required=True, help="a GGUF file (repeatable)")
    ap.add_argument("--prefill", default="512,4096", help="prompt lengths of the prefill tests")
    ap.add_argument("--depths", default="0,4096", help="cache depths of the decode tests")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="hici untimed runs (llama-bench warms up once)")
    ap.add_argument("--iters", type=int, default=3, help="timed runs per test, both sides")
    ap.add_argument("--wait-quiet", type=float, default=120.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for path in [args.hici, args.llama_bench, *args.model]:
        if not path.exists():
            ap.error(f"{path}: not found")

    tests = [("prefill", int(p)) for p in args.prefill.split(",") if p] + [
        ("decode", int(d)) for d in args.depths.split(",") if d
    ]
    results = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for model in args.model:
        for kind, size in tests:
            row = {"model": model.name, "test": kind, "size": size}
            for side in ("llama.cpp", "hici"):
                wait_quiet(timeout=args.wait_quiet)
                before = loadavg()
                if side == "llama.cpp":
                    r = run_llama(args, model, size, 0, 0) if kind == "prefill" else run_llama(
                        args, model, 0, args.gen_len, size)
                else:
                    r = run_hici(args, model, size, 0) if kind == "prefill" else run_hici(
                        args, model, max(size, 16), args.gen_len)
                r["loadavg"] = [before, loadavg()]
                row[side] = r
                print(f"  {model.name} {kind} {size} {side}: {r['tokens_per_s']:.1f} tok/s", file=sys.stderr)
            row["ratio"] = row["hici"]["tokens_per_s"] / row["llama.cpp"]["tokens_per_s"]
            results.append(row)

    print("| file | test | llama.cpp tok/s | hici tok/s | hici / llama.cpp |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        what = f"prefill {r['size']}" if r["test"] == "prefill" else f"decode at depth {r['size']}"
        print(
            f"| {r['model']} | {what} | {r['llama.cpp']['tokens_per_s']:.1f} | "
            f"{r['hici']['tokens_per_s']:.1f} | **{r['ratio']:.2f}** |"
        )
    if args.out:
        doc = {
            "schema": "hici-compare-llamacpp/1",
            "started": started,
            "git_commit": git_commit(),
            "threads": args.threads,
            "gen_len": args.gen_len,
            "iters": args.iters,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "results": results,
        }
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
