"""Sampling throughput and compilations: `python -m plutao.experiments.sampling_bench [--old PATH]`.

A small random GPT (d_model 128, 4 layers, context 128): tokens/s for one prompt, for 32 prompts of
mixed lengths and settings (greedy, temperature, top-k, top-p) in one batch, and the number of
XLA compilations that 100 sampling calls with varied settings, prompt lengths and budgets trigger.
Runs cross the context, so they include re-prefills.

`--old PATH` measures another generation module with the same public `generate` instead (e.g. one
saved with `git show REV:model/decode.py > /tmp/old/decode.py`; for revisions before the engine moved
out of it, `REV:model/sampling.py`). A sampler that takes one setting
per call serves the mixed batch as one call per distinct setting (its rows then share a seed).
Timings are the best of --repeats calls after a first one, which includes compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.gpt import GPT

MODEL = ModelConfig(vocab_size=256, context_length=128, n_layers=4, d_model=128, n_heads=4)
MIXED = [{"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 1.0, "top_k": 40},
         {"temperature": 0.9, "top_p": 0.9}, {"temperature": 1.2, "top_k": 20, "top_p": 0.8}]
EOT, PAD = 1, 0


@contextlib.contextmanager
def compilations():
    """Counts the XLA compilations that run inside the block."""
    count = [0]

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def load_sampler(path: str | None):
    """The generation module to measure: this checkout's (model/decode.py), or a file given by path (an
    older single-file sampling.py also has `generate`)."""
    if path is None:
        from plutao.model import decode
        return decode
    spec = importlib.util.spec_from_file_location("sampling_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def per_row(sampler) -> bool:
    """Whether this `generate` takes one SamplingConfig per prompt."""
    return hasattr(sampler, "SlotDecoder")


def run_mixed(sampler, model, prompts, settings) -> int:
    """Generate every prompt under its own settings; returns the tokens produced."""
    if per_row(sampler):
        return sum(map(len, sampler.generate(model, prompts, settings, eot_id=EOT, pad_id=PAD)))
    # One call per distinct setting (the seed aside: such a call gives its rows one seed).
    groups: dict = {}
    for p, s in zip(prompts, settings):
        groups.setdefault(dataclasses.replace(s, seed=0), []).append(p)
    return sum(sum(map(len, sampler.generate(model, ps, s, eot_id=EOT, pad_id=PAD))) for s, ps in groups.items())


def timed(fn, repeats: int) -> tuple[float, float, int]:
    """(first call's seconds, best later call's seconds, tokens per call)."""
    t = time.perf_counter()
    n = fn()
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t)
    return first, best, n


def measure(sampler, *, new_tokens: int, calls: int, repeats: int, say) -> dict:
    model = GPT(MODEL, nnx.Rngs(0))
    config = sampler.SamplingConfig
    rng = random.Random(0)
    result = {"device": jax.devices()[0].device_kind, "per_row_settings": per_row(sampler)}

    one = config(temperature=0.8, top_k=40, max_new_tokens=new_tokens, seed=0, stop_at_eot=False)
    prompt = [rng.randrange(2, MODEL.vocab_size) for _ in range(16)]
    first, best, n = timed(lambda: run_mixed(sampler, model, [prompt], [one]), repeats)
    result["batch1"] = {"tokens_per_sec": n / best, "first_call_seconds": first, "tokens": n}
    say(f"batch 1: {n / best:,.0f} tokens/s ({n} tokens in {best:.2f} s; first call {first:.1f} s)")

    prompts = [[rng.randrange(2, MODEL.vocab_size) for _ in range(4 + b)] for b in range(32)]
    settings = [config(**MIXED[b % len(MIXED)], max_new_tokens=new_tokens, seed=b, stop_at_eot=False)
                for b in range(32)]
    first, best, n = timed(lambda: run_mixed(sampler, model, prompts, settings), repeats)
    calls_per_batch = 1 if per_row(sampler) else len({dataclasses.replace(s, seed=0) for s in settings})
    result["batch32_mixed"] = {"tokens_per_sec": n / best, "first_call_seconds": first, "tokens": n,
                               "generate_calls": calls_per_batch}
    say(f"batch 32, mixed settings ({calls_per_batch} generate call{'s' if calls_per_batch > 1 else ''}): "
        f"{n / best:,.0f} tokens/s ({n} tokens in {best:.2f} s; first call {first:.1f} s)")

    if not calls:
        return result
    with compilations() as count:
        t = time.perf_counter()
        for _ in range(calls):
            # Lengths up to a power of two drawn per call, so that every prompt-width bucket comes up.
            longest = min(MODEL.context_length, 2 ** rng.randint(0, MODEL.context_length.bit_length()))
            ps = [[rng.randrange(2, MODEL.vocab_size) for _ in range(rng.randint(1, longest))] for _ in range(4)]
            s = config(temperature=rng.choice([0.0, 0.5, 0.8, 1.0, 1.3]), top_k=rng.choice([0, 5, 20, 50]),
                       top_p=rng.choice([1.0, 0.95, 0.8]), seed=rng.randrange(10**6),
                       max_new_tokens=rng.randint(1, 64), stop_at_eot=False)
            # A per-row sampler gets four settings per call; one that takes a setting per call, one.
            if per_row(sampler):
                s = [s] + [config(**{**s.__dict__, "seed": s.seed + i, "temperature": rng.choice([0.0, 0.7, 1.1]),
                                     "top_k": rng.choice([0, 8])}) for i in range(1, 4)]
            sampler.generate(model, ps, s, eot_id=EOT, pad_id=PAD)
        wall = time.perf_counter() - t
    result["varied_calls"] = {"calls": calls, "compilations": count[0], "seconds": wall}
    say(f"{calls} calls with varied settings, prompt lengths and budgets (batch 4): {count[0]} compilations, "
        f"{wall:.1f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plutao.experiments.sampling_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", metavar="PATH", help="measure this sampling.py instead of the checkout's")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=100, help="varied calls to count compilations over")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first (best is kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.old and not Path(args.old).is_file():
        print(f"error: --old {args.old} is no file; save one with `git show REV:model/decode.py > PATH`",
              file=sys.stderr)
        return 2
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    say(f"sampler: {args.old or 'plutao.model.sampling'}; GPT d_model {MODEL.d_model}, {MODEL.n_layers} layers, "
        f"context {MODEL.context_length}, random weights; {jax.devices()[0].device_kind}")
    result = measure(load_sampler(args.old), new_tokens=args.new_tokens, calls=args.calls, repeats=args.repeats,
                     say=say)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
