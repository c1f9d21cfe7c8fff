#!/usr/bin/env python3
"""Time to first token and decode speed through `hici serve`, next to the CLI on the same model.

Starts `hici serve --model MODEL` on a free port, then for each concurrency N sends N streamed
chat requests at once (greedy, `max_tokens` tokens each, `ignore`-free: the prompt asks for a
long answer) with the official `openai` client, measuring on the client: time to first content
chunk, per-stream decode tok/s (tokens after the first / time from first to last chunk) and
aggregate generated tok/s (all tokens / wall time). It also runs `hici generate --json` with
the same prompt and token count for the CLI's own numbers. Prints a Markdown table and writes
the JSON to --out.

Usage: python3 bench/server_bench.py --hici target/release/hici --model M.gguf \
         [--concurrency 1,4,8] [--max-tokens 48] [--out bench/results/server-cpu.json]
"""

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import time

import openai

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def stream_once(client, model, max_tokens):
    t0 = time.time()
    first = last = None
    n = 0
    usage = None
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                now = time.time()
                first = first or now
                last = now
                n += 1
    toks = usage.completion_tokens if usage else n
    dec = (toks - 1) / (last - first) if last and first and last > first else 0.0
    return {"ttft_s": (first or time.time()) - t0, "tokens": toks, "decode_tps": dec,
            "end": last or time.time(), "start": t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hici", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    cli = subprocess.run(
        [a.hici, "--model", a.model, "--json", "generate", "--chat", "--prompt", PROMPT,
         "--max-new-tokens", str(a.max_tokens), "--ignore-eos"],
        capture_output=True, text=True, check=True)
    c = json.loads(cli.stdout)
    cli_row = {"ttft_s": c["timings"]["time_to_first_token_s"],
               "decode_tps": c["timings"]["decode_tokens_per_s"],
               "tokens": c["generated_tokens"]}

    srv = subprocess.Popen(
        [a.hici, "--model", a.model, "serve", "--port", "0", "--max-batch", str(a.max_batch)],
        stderr=subprocess.PIPE, text=True)
    addr = None
    for line in srv.stderr:
        m = re.search(r"listening on http://([^/]+)/v1", line)
        if m:
            addr = m.group(1)
            break
    client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="x", max_retries=0)
    model = client.models.list().data[0].id  # waits for nothing; health is checked next
    import urllib.request
    while True:
        try:
            if urllib.request.urlopen(f"http://{addr}/health").status == 200:
                break
        except Exception:
            time.sleep(0.1)
    stream_once(client, model, 8)  # warm-up
    rows = []
    try:
        for n in [int(x) for x in a.concurrency.split(",")]:
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(n) as ex:
                res = list(ex.map(lambda _: stream_once(client, model, a.max_tokens), range(n)))
            wall = time.time() - t0
            rows.append({
                "concurrency": n,
                "ttft_s_mean": sum(r["ttft_s"] for r in res) / n,
                "ttft_s_max": max(r["ttft_s"] for r in res),
                "per_stream_decode_tps_mean": sum(r["decode_tps"] for r in res) / n,
                "aggregate_generated_tps": sum(r["tokens"] for r in res) / wall,
                "tokens_per_stream": res[0]["tokens"],
            })
    finally:
        srv.terminate()
        srv.wait(timeout=60)
    print(f"CLI `hici generate`: TTFT {cli_row['ttft_s']*1e3:.0f} ms, decode "
          f"{cli_row['decode_tps']:.2f} tok/s ({cli_row['tokens']} tokens)")
    print("| streams | TTFT ms (mean / max) | per-stream decode tok/s | aggregate tok/s |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['ttft_s_mean']*1e3:.0f} / {r['ttft_s_max']*1e3:.0f} | "
              f"{r['per_stream_decode_tps_mean']:.2f} | {r['aggregate_generated_tps']:.2f} |")
    doc = {"model": a.model, "max_tokens": a.max_tokens, "max_batch": a.max_batch,
           "prompt": PROMPT, "cli": cli_row, "server": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
