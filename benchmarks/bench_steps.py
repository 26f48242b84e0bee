"""Steady-state training-step time: our jitted SFT and Booster steps vs PyTorch and vs a plain JAX step.

Three implementations of the same step on the same weights and batches, AdamW + clipping 1.0:

* ours: ``jax.jit`` of the registered step (``get_method``), state donated as the training loop does;
* PyTorch: ``tests/torch_reference.TorchReference`` (the official trainer step on transformers +
  PEFT, eager), with transformers' **default attention** (SDPA), as a user runs it; ``--eager-row``
  adds the same step with ``attn_implementation="eager"`` as a labelled extra row;
* plain JAX: ``plain_jax_steps`` below, a minimal step written from the maths (unrolled layers,
  LoRA as ``x @ A @ B * scale``), the yardstick for what XLA can do with this model.

Every row is the median of ``--steps`` rounds in which all implementations run one step each,
interleaved, in one process (load drift on a shared host hits all alike); the load average is
printed at the start and the end. Compile time is ``lower().compile()`` of our step, as wall time and as
process CPU time (XLA compiles on one thread, so the CPU time is what the compile costs on an idle host
even when the host is loaded); ``--compile-only`` prints just that and skips the timed rounds.

Shapes: ``--shape bench`` (default: hidden 256, 4 layers, vocab 1000, batch 10 x 64) or
``--shape smollm2`` (SmolLM2-135M-Instruct's architecture, randomly initialised: 30 layers,
hidden 576, intermediate 1536, 9 heads / 3 KV heads, head_dim 64, rope theta 1e5, tied embeddings,
vocab 49152, batch 8 x 64); ``--model DIR`` uses a local Hugging Face LLaMA directory's weights.
LoRA r 32, alpha 4 on q, k, v (the paper's adapter).

    python benchmarks/bench_steps.py [--shape bench|smollm2] [--model DIR] [--steps 20] [--threads 1]
                                     [--eager-row] [--skip-torch] [--batch 10] [--seq 64] ...

``--threads 1`` (the default, the main rows) pins the whole process to one CPU (``--cpu N``, default
the lowest CPU it may use) before jax or torch start, and sets torch to one thread: XLA's thread
flags alone do not bound its CPU thread pool (jax 0.10.2 used ~2 CPU seconds per wall second), so the
affinity is what makes ours / PyTorch one thread against one thread. It is checked: every row prints
its process CPU time per wall second over the timed calls, and with ``--threads 1`` the run stops
(SystemExit naming ``--threads 1``) before printing the table if any row exceeds 1.2. ``--threads 0``
leaves both libraries at their defaults (all cores).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "bench": dict(batch=10, seq=64, hidden=256, intermediate=688, layers=4, heads=4, kv_heads=None,
                  vocab=1000, rope_theta=10000.0, rms_eps=1e-6, tie=False),
    "smollm2": dict(batch=8, seq=64, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
                    vocab=49152, rope_theta=100000.0, rms_eps=1e-5, tie=True),
}


def model_options(description: str) -> argparse.ArgumentParser:
    """The model and batch options shared by the step benchmarks (bench_steps, bench_methods, ...)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", choices=sorted(SHAPES), default="bench", help="model/batch preset (see the docstring)")
    p.add_argument("--model", default="", help="a local Hugging Face LLaMA directory (its weights and config)")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (median reported)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=4.0)
    p.add_argument("--no-scan", action="store_true", help="ours with model.scan_layers false (unrolled layer loop)")
    return p


MAX_CPU_PER_WALL = 1.2  # one thread cannot use more CPU than wall time; the rest is timer slack


def thread_options(p: argparse.ArgumentParser, default: int) -> argparse.ArgumentParser:
    """``--threads`` and ``--cpu``, the same in every CPU benchmark (see ``pin_threads``)."""
    p.add_argument("--threads", type=int, default=default,
                   help="1 = the whole process pinned to one CPU, torch on one thread; 0 = library defaults")
    p.add_argument("--cpu", type=int, help="the CPU --threads 1 pins to (default: the lowest this process may use)")
    return p


def pin_threads(args) -> None:
    """``--threads 1``: pin every thread of this process (and so every thread it starts later) to one CPU.

    XLA's thread flags do not bound its CPU thread pool, so only the affinity makes a wall-clock ratio
    against one-thread torch a one-thread-vs-one-thread ratio. Call before jax or torch start their pools.
    """
    if args.threads != 1:
        if args.cpu is not None:
            raise SystemExit("--cpu only applies with --threads 1")
        return
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("--threads 1 needs os.sched_setaffinity (Linux) to pin the process to one CPU")
    allowed = os.sched_getaffinity(0)
    args.cpu = min(allowed) if args.cpu is None else args.cpu
    if args.cpu not in allowed:
        raise SystemExit(f"--threads 1: --cpu {args.cpu} is not one of this process's CPUs {sorted(allowed)}")
    for tid in os.listdir("/proc/self/task"):  # threads already running (normally just this one)
        try:
            os.sched_setaffinity(int(tid), {args.cpu})
        except ProcessLookupError:  # it ended meanwhile
            pass
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def cpu_per_wall(wall, cpu) -> float:
    """Process CPU seconds per wall second over a row's timed calls (at most ~1 on one thread)."""
    return sum(cpu) / max(sum(wall), 1e-12)


def check_one_thread(args, ratios: dict) -> None:
    """With ``--threads 1``, stop before any table is printed if a row used more than one thread's CPU time."""
    over = {k: r for k, r in ratios.items() if r > MAX_CPU_PER_WALL}
    if args.threads == 1 and over:
        raise SystemExit("--threads 1 did not hold: CPU/wall " + ", ".join(f"{k} {r:.2f}" for k, r in over.items()) +
                         f" > {MAX_CPU_PER_WALL}, so more than one thread ran and the wall-clock ratios would not "
                         "be one thread vs one thread; no table printed")


def threads_note(args) -> str:
    return f"one thread (process pinned to CPU {args.cpu})" if args.threads == 1 else "XLA default threads"


def parse_with_threads(p: argparse.ArgumentParser, argv):
    """Parse (``p`` has ``thread_options``), pin with ``--threads 1`` first, fill unset model options from ``--shape``."""
    args = p.parse_args(argv)
    pin_threads(args)  # before booster_jax.models.hf below imports jax
    for k, v in SHAPES[args.shape].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.kv_heads = args.kv_heads or args.heads
    if args.model:
        from booster_jax.models import hf

        cfg = hf.read_config(args.model)
        args.hidden, args.intermediate, args.layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        args.heads, args.kv_heads, args.vocab = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    args.head_dim = args.hidden // args.heads
    return args


def parse(argv, description):
    p = model_options(description)
    thread_options(p, default=1)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--compile-only", action="store_true", help="only compile our two steps and print the times")
    p.add_argument("--eager-row", action="store_true", help="extra row: PyTorch with eager attention")
    p.add_argument("--response-share", type=float, default=None,
                   help="each row's answer (the loss targets) is this share of its tokens (the real setting: ~0.4); "
                        "default: prompts of 1..n/2 tokens, as before")
    p.add_argument("--full-head-row", action="store_true",
                   help="extra row: our step with the LM head at every position (before issue 27), interleaved")
    return parse_with_threads(p, argv)


def build(args):
    """The same base model and PEFT-initialised LoRA for both sides: (peft_model, params, lora, forward)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from booster_jax.methods.base import Forward
    from booster_jax.models import hf
    from booster_jax.models.llama import make_model
    from booster_jax.models.lora import load_peft

    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        config = AutoConfig.for_model(
            "llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim, rope_theta=args.rope_theta, rms_norm_eps=args.rms_eps,
            max_position_embeddings=2048, tie_word_embeddings=args.tie)
        base = AutoModelForCausalLM.from_config(config).float()  # transformers' default attention (SDPA)
    conf = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules=["q_proj", "k_proj", "v_proj"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(os.path.join(d, "base"))  # before PEFT wraps the projections
        peft_model = get_peft_model(base, conf)
        cfg = hf.read_config(os.path.join(d, "base"))
        params = hf.load_params(os.path.join(d, "base"), cfg)
        peft_model.save_pretrained(os.path.join(d, "lora"))
        lora, spec = load_peft(os.path.join(d, "lora"), cfg)
    return peft_model, params, lora, Forward(make_model(cfg, spec, scan_layers=not args.no_scan))


def make_batches(args, n):
    import numpy as np

    from tests.torch_reference import synthetic_batch

    rng = np.random.default_rng(0)

    from booster_jax.data.batches import buckets_up_to, target_index

    def one(seed):
        lengths = rng.integers(args.seq // 2, args.seq + 1, args.batch)
        lengths[0] = args.seq
        if args.response_share is None:
            prompts = [int(rng.integers(1, n_ // 2 + 1)) for n_ in lengths]
        else:
            prompts = [max(1, int(round(n_ * (1 - args.response_share)))) for n_ in lengths]
        batch = synthetic_batch(args.vocab, lengths, prompts, args.seq, seed=seed)
        # as collate builds it: the LM head's positions, K from four buckets up to the length
        return {**batch, "target_index": target_index(batch["loss_mask"], buckets_up_to(args.seq))}

    return [{"align": one(2 * i), "harmful": one(2 * i + 1)} for i in range(n)]


# ---- the plain JAX baseline: the same maths, written directly (unrolled layers, no Flax) ----
def plain_jax_weights(params, lora, cfg):
    """Our stacked trees as per-layer lists (outside jit): base [{name: W}], LoRA [{proj: (A, B)}]."""
    L, lay = cfg.num_layers, params["layers"]
    base = [{"ln1": lay["input_layernorm"]["scale"][i], "ln2": lay["post_attention_layernorm"]["scale"][i],
             **{p: lay[blk][p]["kernel"][i] for blk, ps in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                            ("mlp", ("gate_proj", "up_proj", "down_proj")))
                for p in ps}} for i in range(L)]
    embed = params["embed_tokens"]["embedding"]
    head = embed.T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    frozen = {"layers": base, "embed": embed, "norm": params["norm"]["scale"], "head": head}
    adapters = [{p: (ab["a"][i], ab["b"][i]) for blk in lora["layers"].values() for p, ab in blk.items()}
                for i in range(L)]
    return frozen, adapters


def plain_jax_loss(cfg, scaling):
    """``loss(adapters, frozen, batch)``: token-mean LM loss of the LLaMA with LoRA, unrolled over layers."""
    import jax
    import jax.numpy as jnp

    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)

    def rms(x, w):
        return w * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)

    def lin(x, w, ab):
        return x @ w if ab is None else x @ w + (x @ ab[0]) @ ab[1] * scaling

    def loss(adapters, frozen, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, t = ids.shape
        ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq
        cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1))[:, None], jnp.sin(jnp.concatenate([ang, ang], -1))[:, None]
        rope = lambda x: x * cos + jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin  # noqa: E731
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & (mask[:, None, None, :] > 0)
        x = frozen["embed"][ids]
        for w, a in zip(frozen["layers"], adapters):
            h = rms(x, w["ln1"])
            q = rope(lin(h, w["q_proj"], a.get("q_proj")).reshape(b, t, nh, hd))
            k = rope(lin(h, w["k_proj"], a.get("k_proj")).reshape(b, t, nkv, hd))
            v = lin(h, w["v_proj"], a.get("v_proj")).reshape(b, t, nkv, hd)
            k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
            s = jnp.where(allowed, jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), -1e30)
            o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, nh * hd)
            x = x + lin(o, w["o_proj"], a.get("o_proj"))
            h = rms(x, w["ln2"])
            x = x + lin(jax.nn.silu(lin(h, w["gate_proj"], a.get("gate_proj"))) * lin(h, w["up_proj"], a.get("up_proj")),
                        w["down_proj"], a.get("down_proj"))
        logp = jax.nn.log_softmax(rms(x, frozen["norm"])[:, :-1] @ frozen["head"], -1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        weights = batch["loss_mask"][:, 1:]
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return loss


def plain_jax_steps(cfg, scaling, optimizer, lam, alpha, eps=1e-7):
    """(sft_step, booster_step), each ``(frozen, (lora, opt_state), batches) -> ((lora, opt_state), loss)``."""
    import jax
    import optax

    grad = jax.value_and_grad(plain_jax_loss(cfg, scaling))

    def update(state, g):
        upd, opt = optimizer.update(g, state[1], state[0])
        return optax.apply_updates(state[0], upd), opt

    def sft_step(frozen, state, batches):
        value, g = grad(state[0], frozen, batches["align"])
        return update(state, g), value

    def booster_step(frozen, state, batches):
        w = state[0]
        h, g1 = grad(w, frozen, batches["harmful"])
        scale = alpha / (optax.tree.norm(g1) + eps)
        _, g2 = grad(jax.tree.map(lambda p, g: p - scale * g, w, g1), frozen, batches["harmful"])
        f, g3 = grad(w, frozen, batches["align"])
        return update(state, jax.tree.map(lambda a, b, c: a + lam * b - lam * c, g3, g1, g2)), f

    return sft_step, booster_step


def median_ms(times):
    return 1000 * statistics.median(times)


def host_line(args, torch):
    return (f"host {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}, {threads_note(args)}")


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def shape_line(args, rows_note: str) -> str:
    import jax
    import torch

    src = f"weights of {args.model}" if args.model else f"shape {args.shape}, random weights"
    src += ", ours with the layer loop unrolled (--no-scan)" if args.no_scan else ", ours with scanned layers"
    return (f"model ({src}): hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
            f"{args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}, float32; LoRA r {args.rank} "
            f"alpha {args.lora_alpha:g} on q,k,v; batches {args.batch} x {args.seq} tokens; {rows_note}; "
            f"JAX {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}; {host_line(args, torch)}")


def interleave(runners: dict, steps: int) -> tuple[dict, dict]:
    """Wall and process-CPU seconds per call of every runner over ``steps`` rounds, each round calling
    every runner once (with one thread per side, CPU time is what a call costs, whatever the load)."""
    wall, cpu = {k: [] for k in runners}, {k: [] for k in runners}
    for i in range(1, steps + 1):
        for key, run in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(i)
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    return wall, cpu


def cpu_ratios(cpu: dict, pairs) -> str:
    """``name a/b x.xx`` for each (name, a, b) present, from median CPU times."""
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return ", ".join(f"{name} {med[a] / med[b]:.2f}" for name, a, b in pairs if a in med and b in med)


def main(argv=None):
    args = parse(argv, __doc__.splitlines()[0])
    import jax
    import jax.numpy as jnp

    from booster_jax.config import BoosterConfig, OptimConfig
    from booster_jax.methods.base import StepContext, get_method, init_state, make_optimizer
    from tests.torch_reference import TorchReference, to_torch

    load_start = load_avg()
    peft_model, params, lora, forward = build(args)
    cfg = forward.model.cfg
    data = make_batches(args, args.steps + 1)
    jdata = [jax.tree.map(jnp.asarray, b) for b in data]
    optim = OptimConfig(lr=5e-4, weight_decay=0.1, max_grad_norm=1.0)
    booster = BoosterConfig(lam=5.0, alpha=0.1)
    compile_s, compile_cpu_s, runners, first_loss = {}, {}, {}, {}

    full_head = [jax.tree.map(lambda b: {k: v for k, v in b.items() if k != "target_index"}, d,
                              is_leaf=lambda x: isinstance(x, dict) and "input_ids" in x) for d in jdata]
    variants = [("ours", jdata)] + ([("ours_full", full_head)] if args.full_head_row else [])
    for impl, batches in variants:
        for method in ("sft", "booster"):
            optimizer = make_optimizer(optim)
            step = jax.jit(get_method(method, "align").make_step(StepContext(forward, optimizer, booster)),
                           donate_argnums=(1,))
            box = {"state": init_state(jax.tree.map(jnp.copy, lora), optimizer)}  # donated: a copy each
            t0, c0 = time.perf_counter(), time.process_time()
            compiled = step.lower(params, box["state"], batches[0], jax.random.key(0)).compile()
            if impl == "ours":
                compile_s[method], compile_cpu_s[method] = time.perf_counter() - t0, time.process_time() - c0
            if args.compile_only:
                continue

            def run(i, step=compiled, box=box, batches=batches):
                box["state"], m = step(params, box["state"], batches[i], jax.random.key(i))
                jax.block_until_ready((box["state"], m))
                return m["loss"]

            first_loss[(impl, method)] = float(run(0))
            runners[(impl, method)] = run

    if args.compile_only:
        print(shape_line(args, "compile only") + f"; load average {load_start} at the start, {load_avg()} at the end\n")
        print("| method | layers | scanned | compile wall (s) | compile CPU (s) |\n|---|---:|---|---:|---:|")
        for method in ("sft", "booster"):
            print(f"| {method} | {cfg.num_layers} | {'no' if args.no_scan else 'yes'} | {compile_s[method]:.1f} | "
                  f"{compile_cpu_s[method]:.1f} |")
        print(f"command: python benchmarks/bench_steps.py {' '.join(argv if argv is not None else sys.argv[1:])}")
        return

    frozen, adapters = plain_jax_weights(params, lora, cfg)
    plain = dict(zip(("sft", "booster"), plain_jax_steps(cfg, forward.model.lora.scaling, make_optimizer(optim),
                                                         booster.lam, booster.alpha, booster.eps)))
    for method, fn in plain.items():
        step = jax.jit(fn, donate_argnums=(1,))
        box = {"state": (jax.tree.map(jnp.copy, adapters), make_optimizer(optim).init(adapters))}

        def run(i, step=step, box=box):
            box["state"], m = step(frozen, box["state"], jdata[i])
            jax.block_until_ready((box["state"], m))
            return m

        first_loss[("plain", method)] = float(run(0))
        runners[("plain", method)] = run

    if not args.skip_torch:
        tdata = [{k: to_torch(v) for k, v in b.items()} for b in data]
        impls = [("torch", peft_model)]
        if args.eager_row:
            eager = copy.deepcopy(peft_model)
            eager.set_attn_implementation("eager")
            impls.append(("torch_eager", eager))
        for impl, model in impls:
            for method in ("sft", "booster"):
                ref = TorchReference(copy.deepcopy(model), lr=optim.lr, weight_decay=optim.weight_decay,
                                     max_grad_norm=optim.max_grad_norm, lam=booster.lam, alpha=booster.alpha)
                if method == "booster":
                    run = lambda i, ref=ref: ref.booster_step(tdata[i]["align"], tdata[i]["harmful"])
                else:
                    run = lambda i, ref=ref: ref.sft_step(tdata[i]["align"])
                first_loss[(impl, method)] = float(run(0)["loss"])  # also the warm-up
                runners[(impl, method)] = run
        attn = peft_model.config._attn_implementation

    times, cpu = interleave(runners, args.steps)
    per_wall = {k: cpu_per_wall(times[k], cpu[k]) for k in runners}
    check_one_thread(args, {" ".join(k): r for k, r in per_wall.items()})
    res = {k: median_ms(v) for k, v in times.items()}
    print(shape_line(args, f"median of {args.steps} rounds after a warm-up, all {len(runners)} runs interleaved "
                           f"step by step in one process") +
          f"; load average (1/5/15 min) {load_start} at the start, {load_avg()} at the end\n")
    print("| implementation | method | ms / step (median) | Booster / SFT | ours / PyTorch | ours / plain JAX | "
          "min ms | CPU ms (median) | CPU / wall | compile wall / CPU (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"ours": "booster_jax (jit)", "ours_full": "extra: booster_jax, LM head at every position",
             "plain": "plain JAX (jit, unrolled, in this file)",
             "torch": f"PyTorch reference (transformers default attention: {attn if not args.skip_torch else '-'})",
             "torch_eager": "extra: PyTorch reference, eager attention"}
    for impl in ("ours", "ours_full", "plain", "torch", "torch_eager"):
        for method in ("sft", "booster"):
            if (impl, method) not in res:
                continue
            ms = res[(impl, method)]
            ratio = f"{ms / res[(impl, 'sft')]:.2f}" if method == "booster" else "-"
            ours = impl in ("ours", "ours_full")
            vs_t = f"{ms / res[('torch', method)]:.2f}" if ours and ("torch", method) in res else "-"
            vs_p = f"{ms / res[('plain', method)]:.2f}" if ours else "-"
            first = f"{compile_s[method]:.1f} / {compile_cpu_s[method]:.1f}" if impl == "ours" else "-"
            print(f"| {names[impl]} | {method} | {ms:.1f} | {ratio} | {vs_t} | {vs_p} | "
                  f"{1000 * min(times[(impl, method)]):.1f} | {median_ms(cpu[(impl, method)]):.1f} | "
                  f"{per_wall[(impl, method)]:.2f} | {first} |")
    pairs = [(f"ours/PyTorch {m}", ("ours", m), ("torch", m)) for m in ("sft", "booster")]
    pairs += [(f"ours/plain {m}", ("ours", m), ("plain", m)) for m in ("sft", "booster")]
    pairs += [(f"ours/full head {m}", ("ours", m), ("ours_full", m)) for m in ("sft", "booster")
              if ("ours_full", m) in cpu]
    pairs += [(f"Booster/SFT {i}", (i, "booster"), (i, "sft")) for i in ("ours", "plain", "torch")]
    print(f"\nthe same ratios from process CPU time: {cpu_ratios(cpu, pairs)}")
    print("first-step alignment loss (the same computation everywhere): " +
          ", ".join(f"{i} {m} {v:.6f}" for (i, m), v in first_loss.items()))
    given = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python benchmarks/bench_steps.py {given}".rstrip())


if __name__ == "__main__":
    main()
