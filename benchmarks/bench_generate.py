"""Generated tokens/s: our jitted KV-cache decoder vs transformers ``generate`` (greedy, same weights).

A random LLaMA (hidden 256, 4 layers, 8 heads, vocab 32000) in float32; a batch of
prompts of one length; a fixed number of new tokens (no EOS stop: EOS is disabled on
both sides). Ours is timed after a warm-up call that compiles; the compile time is
reported separately. Prints a Markdown table and the command that produced it.

    python benchmarks/bench_generate.py [--model DIR] [--batch 8] [--prompt-len 32] [--new-tokens 64] [--repeats 3] [--threads 1]

``--model DIR`` times a local Hugging Face LLaMA directory's weights instead of the random model.
``--threads 1`` (the default) pins the whole process to one CPU (``--cpu N``, default the lowest
it may use) before jax or torch start, and torch to one thread: on a shared, oversubscribed host,
torch's OpenMP threads spin against other processes and a [8, 256] x [256, 688] linear can take
milliseconds instead of microseconds, which would measure the host's load rather than the decoders;
and XLA's thread flags alone do not bound its CPU thread pool. It is checked: each row prints its
process CPU time per wall second over the timed calls, and with ``--threads 1`` the run stops
(SystemExit naming ``--threads 1``) before the table if either exceeds 1.2. ``--threads 0`` leaves
both libraries at their defaults.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_steps import check_one_thread, cpu_per_wall, pin_threads, thread_options, threads_note  # noqa: E402


def build_reference(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    config = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                  intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).float().eval()


def time_calls(fn, repeats):
    """(median wall seconds per call, process CPU seconds per wall second over the calls)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), cpu_per_wall(wall, cpu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a local Hugging Face LLaMA directory (default: a random model)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    thread_options(p, default=1)
    args = p.parse_args(argv)
    pin_threads(args)  # before jax and torch start their thread pools

    import jax
    import numpy as np
    import torch

    from booster_jax.eval import generate as gen
    from booster_jax.models import hf
    from booster_jax.models.llama import make_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    ref = build_reference(args)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        cfg = hf.read_config(d)
        params = hf.load_params(d, cfg)
    model = make_model(cfg)
    if args.model:  # the options describe the printed model
        args.hidden, args.layers, args.heads, args.vocab = cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, args.vocab, (args.batch, args.prompt_len)).tolist()
    n_tokens = args.batch * args.new_tokens

    def ours():
        return gen.generate(model, params, None, prompts, max_new_tokens=args.new_tokens, eos_id=None, pad_id=0,
                            batch_size=args.batch, bucket=args.prompt_len)

    t0 = time.perf_counter()
    ours_out = ours()
    first_call = time.perf_counter() - t0
    t_ours, ours_per_wall = time_calls(ours, args.repeats)

    ids = torch.tensor(prompts)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0

    def theirs():
        with torch.inference_mode():
            return ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)

    ref_out = theirs()[:, args.prompt_len:].tolist()
    t_ref, ref_per_wall = time_calls(theirs, args.repeats)
    check_one_thread(args, {"booster_jax generate": ours_per_wall, "transformers generate": ref_per_wall})
    same = sum(a == b for a, b in zip(ours_out, ref_out))

    jax_dev = jax.devices()[0]
    torch_dev = "cpu"
    print(f"model{' ' + args.model if args.model else ''}: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, float32; "
          f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens (greedy, no EOS); "
          f"median of {args.repeats} after warm-up; host {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {threads_note(args)}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| implementation | device | time / batch (s) | generated tokens/s | CPU / wall | first call incl. compile (s) |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| booster_jax generate (jit, KV cache, while_loop) | {jax_dev.platform} | {t_ours:.3f} | "
          f"{n_tokens / t_ours:,.0f} | {ours_per_wall:.2f} | {first_call:.2f} |")
    print(f"| transformers {__import__('transformers').__version__} generate | {torch_dev} | {t_ref:.3f} | "
          f"{n_tokens / t_ref:,.0f} | {ref_per_wall:.2f} | - |")
    print(f"\nidentical greedy outputs: {same}/{args.batch} sequences")
    print(f"command: python benchmarks/bench_generate.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
