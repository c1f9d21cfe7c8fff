#!/usr/bin/env python3
"""Prefill scaling table: `hici bench` prefill time vs prompt length, full vs hici-segmented.

Runs `hici bench --synthetic CONFIG --modes MODE --prompt-len N --segments 4 --gen-len 0
--json` for each mode and length (one process each, after waiting for a quiet machine), then prints a Markdown table of prefill seconds per length and
the growth ratio t(2L) / t(L) of each mode (2.0 = linear, 4.0 = quadratic), and writes the raw
JSON to --out. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quiet import wait_quiet  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hici", type=Path, default=ROOT / "target/release/hici")
    ap.add_argument("--config", type=Path, default=ROOT / "bench/configs/cpu-512x8.json")
    ap.add_argument("--lens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--modes", default="full,hici-segmented",
                    help="comma-separated; hici-segmented@T means segments of T tokens (S/T of them)")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=900,
                    help="before each row wait up to this many seconds until no other process is busy (0: off)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/scaling-cpu.json")
    args = ap.parse_args()

    rel = lambda p: os.path.relpath(Path(p).resolve(), ROOT)
    exe = rel(args.hici)
    if not exe.startswith(("/", ".")):
        exe = "./" + exe
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), MATMUL_NUM_THREADS=str(args.threads))
    doc, quiet = None, []
    # one process per (mode, length), each after waiting for a quiet machine
    for mode in args.modes.split(","):
        for n in args.lens.split(","):
            # "hici-segmented@T": segments of T tokens (S/T segments) instead of --segments
            base, _, seg_len = mode.partition("@")
            segments = int(n) // int(seg_len) if seg_len else args.segments
            cmd = [
                exe, "bench", "--synthetic", rel(args.config), "--prompt-len", n,
                "--modes", base, "--segments", str(segments), "--gen-len", "0",
                "--warmup", str(args.warmup), "--iters", str(args.iters), "--json",
            ]
            quiet.append({"mode": mode, "prompt_len": int(n), **wait_quiet(args.wait_quiet)})
            print("+", " ".join(cmd), file=sys.stderr)
            d = json.loads(subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout)
            for r in d["results"]:
                r["mode"] = mode
            if doc is None:
                doc = d
            else:
                doc["results"] += d["results"]

    modes = args.modes.split(",")
    lens = [int(x) for x in args.lens.split(",")]
    t = {(r["mode"], r["prompt_len"]): r["prefill"]["seconds"]["mean"] for r in doc["results"]}
    rss = {(r["mode"], r["prompt_len"]): r["memory"]["peak_rss_bytes"] for r in doc["results"]}
    head = "| prompt | " + " | ".join(
        f"{m} prefill s | {m} growth | {m} peak RSS MiB" for m in modes
    ) + (" | full / segmented |" if len(modes) == 2 else " |")
    lines = [head, "|---:|" + "---:|---:|---:|" * len(modes) + ("---:|" if len(modes) == 2 else "")]
    growth = {m: [] for m in modes}
    for i, n in enumerate(lens):
        cells = [f"{n}"]
        for m in modes:
            cur = t.get((m, n))
            prev = t.get((m, lens[i - 1])) if i else None
            g = cur / prev if cur and prev else None
            if g:
                growth[m].append({"from": lens[i - 1], "to": n, "ratio": g})
            r = rss.get((m, n))
            cells += [
                "-" if cur is None else f"{cur:.2f}",
                "-" if g is None else f"x{g:.2f}",
                "-" if r is None else f"{r >> 20}",
            ]
        if len(modes) == 2 and t.get((modes[0], n)) and t.get((modes[1], n)):
            cells.append(f"{t[(modes[0], n)] / t[(modes[1], n)]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc["settings"]["prompt_lens"] = lens
    doc["settings"]["modes"] = modes
    args.out.write_text(json.dumps({
        "command": " ".join(["scaling.py"] + sys.argv[1:]),
        "hici_command_per_row": " ".join(cmd[:4]) + " ... (see settings)",
        "quiet": quiet, "growth": growth, "markdown": md, "hici": doc,
    }, indent=1) + "\n")
    print(md)
    print(f"\nwritten {rel(args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
