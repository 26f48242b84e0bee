#!/usr/bin/env python
"""Greedy tokens and decode time of ``generate`` on a model directory, for A/B runs across commits.

    python benchmarks/decode_tokens.py MODEL_DIR OUT.json [--prompts 64 --new 64 --batch 32 --min-len 50 --max-len 100]

Random prompts (lengths drawn from [min-len, max-len)), a random non-zero LoRA on q, k, v (so the adapter
path is exercised), EOS disabled so every row decodes ``--new`` tokens. Prints the first call's time
(compile included) and the second's; writes the tokens. Run it from the root of each of two checkouts (it
imports the ``booster_jax`` of the directory it is run from), one after the other on an idle machine, and
``cmp`` the two JSON files: a decoder change that keeps every number must give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-len", type=int, default=50)
    p.add_argument("--max-len", type=int, default=100)
    ns = p.parse_args(argv)
    sys.path.insert(0, os.getcwd())  # the checkout being measured

    import jax
    import numpy as np

    from booster_jax.eval import generate as gen
    from booster_jax.models import hf
    from booster_jax.models.llama import LoraSpec, make_model
    from booster_jax.models.lora import init_lora

    cfg = hf.read_config(ns.model_dir)
    params = hf.load_params(ns.model_dir, cfg)
    spec = LoraSpec(r=8, alpha=4.0, targets=("q_proj", "k_proj", "v_proj"))
    model = make_model(cfg, spec)
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape, x.dtype),
                        init_lora(jax.random.key(1), cfg, spec))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(rng.integers(ns.min_len, ns.max_len))).tolist()
               for _ in range(ns.prompts)]
    times = []
    for _ in range(2):
        t = time.perf_counter()
        out = gen.generate(model, params, lora, prompts, max_new_tokens=ns.new, eos_id=None, pad_id=0,
                           batch_size=ns.batch)
        times.append(time.perf_counter() - t)
    with open(ns.out, "w") as f:
        json.dump(out, f)
    print(f"first call (compile included) {times[0]:.2f} s, second {times[1]:.2f} s; load average "
          f"{os.getloadavg()[0]:.2f}; {ns.prompts} prompts x {ns.new} new tokens, batch {ns.batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
