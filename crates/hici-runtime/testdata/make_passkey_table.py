#!/usr/bin/env python3
"""Generates passkey_numpy.json: reference values of numpy's legacy RandomState for the
passkey protocol (spec §5.4, `passkey_retrieval.py`), checked by tests/passkey.rs.

Run from this directory:  python3 make_passkey_table.py > passkey_numpy.json
Needs only numpy (any version with the legacy `numpy.random.RandomState`).
"""
import json

import numpy as np
from numpy import random

GARBAGE = ("The grass is green. The sky is blue. The sun is yellow. "
           "Here we go. There and back again.")
TASK = ("There is an important info hidden inside a lot of irrelevant text. "
        "Find it and memorize them. I will quiz you about the important information there.")


def n_garbage_of(target):
    # Same expression as passkey_retrieval.py: int(3.75 * (i + 1) * interval // 1024 * 1024).
    return int(3.75 * target // 1024 * 1024)


def generate_prompt_landmark(n_garbage, seed):
    """Copy of the reference prompt builder (numpy global RandomState)."""
    rnd_state = random.get_state()
    random.seed(seed)
    n_garbage_prefix = random.randint(0, n_garbage)
    n_garbage_suffix = n_garbage - n_garbage_prefix
    garbage_inf = " ".join([GARBAGE] * 5000)
    assert len(garbage_inf) >= n_garbage
    garbage_prefix = garbage_inf[:n_garbage_prefix]
    garbage_suffix = garbage_inf[:n_garbage_suffix]
    pass_key = random.randint(1, 50000)
    information_line = f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."
    final_question = "What is the pass key? The pass key is"
    lines = [TASK, garbage_prefix, information_line, garbage_suffix, final_question]
    random.set_state(rnd_state)
    return "\n".join(lines), str(pass_key), int(n_garbage_prefix)


def main():
    rows = []
    for n_garbage in (1024, 3072, 7168, 15360, 60416, 375808):
        for seed in range(10):
            prompt, key, prefix = generate_prompt_landmark(n_garbage, seed)
            rows.append({"seed": seed, "n_garbage": n_garbage, "prefix_chars": prefix,
                         "pass_key": int(key), "prompt_chars": len(prompt)})

    # Whole prompts for the smallest test point (target 1024 tokens).
    prompts = []
    for seed in range(3):
        prompt, key, prefix = generate_prompt_landmark(n_garbage_of(1024), seed)
        prompts.append({"target_tokens": 1024, "seed": seed, "prompt": prompt, "answer": key})

    targets = [274, 1000, 1024, 2048, 4096, 4097, 8192, 10000, 16384, 32768, 100000]
    n_garbage = [{"target_tokens": t, "n_garbage": n_garbage_of(t)} for t in targets]

    # Raw randint draws over ranges that exercise every branch of numpy's legacy bounded
    # int64 path (rng == 0, masked 32-bit, rng == 2^32 - 1, masked 64-bit).
    ranges = [(0, 1), (5, 6), (0, 2), (0, 3), (-7, 9), (0, 1000), (1, 50000),
              (0, 2**31), (0, 2**32 - 1), (0, 2**32), (0, 2**32 + 1), (-5, 2**40 + 3),
              (0, 2**62 + 12345), (-(2**63), 2**63 - 1)]
    draws = []
    for seed in (0, 1, 42, 4294967295):
        rs = np.random.RandomState(seed)
        seq = []
        for _ in range(3):
            for lo, hi in ranges:
                seq.append({"low": lo, "high": hi, "value": int(rs.randint(lo, hi))})
        draws.append({"seed": seed, "draws": seq})

    # First outputs of the raw generator (MT19937 init_genrand) for seed 5489.
    rs = np.random.RandomState(5489)
    raw = [int(x) for x in rs.randint(0, 2**32, size=5, dtype=np.uint64)]

    print(json.dumps({
        "numpy_version": np.__version__,
        "passkey": rows,
        "prompts": prompts,
        "n_garbage": n_garbage,
        "randint": draws,
        "mt19937_seed5489_uint32": raw,
    }, indent=1))


if __name__ == "__main__":
    main()
