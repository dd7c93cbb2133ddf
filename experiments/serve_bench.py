"""`plutao bench-serve RUN`: the server under load against the plain sampler answering the same requests
one at a time, in one process on this machine.

The server (the real engine, routes and uvicorn, on loopback) gets N streamed chat requests at each
concurrency; per request we time the first token (TTFT) and the whole reply; per level, requests/s and
generated tokens/s. The baseline is `model/decode.py: complete` called once per request, in turn, with
the same prompts and settings (warm: its programs compiled first). `--soak S` then keeps `--soak-
concurrency` clients busy for S seconds, a random tenth of them walking away mid-stream, and reports
5xx responses, the slots in use afterwards and the resident memory at the start and the end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(run, n: int, max_tokens: int) -> list[list[dict]]:
    """n chat prompts of the run's arithmetic world (questions like the ones it was trained on) that leave
    max_tokens of its context for the reply."""
    from plutao.tokenizer.chat import prompt_ids
    from plutao.train.worlds import arith

    out, i = [], 0
    while len(out) < n and i < 100 * n:
        p = arith.rl_prompt(run.cfg.world, i)[0]
        i += 1
        if len(prompt_ids(p, run.tokenizer)) + max_tokens <= run.cfg.model.context_length:
            out.append(p)
    if len(out) < n:
        from plutao.train.config.errors import UserError

        raise UserError(f"--max-tokens {max_tokens} leaves too little of the run's context for its questions; lower it")
    return out


async def _one(client, url: str, body: dict, walk_away: bool = False) -> dict:
    t0 = time.perf_counter()
    first, pieces, status = None, 0, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True,
                                                                                 "stream_options": {"include_usage": True}}) as r:
        status = r.status_code
        tokens = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                first = first or time.perf_counter()
                pieces += 1
                if walk_away and pieces >= 2:
                    break
    return {"status": status, "ttft": (first or time.perf_counter()) - t0, "seconds": time.perf_counter() - t0,
            "tokens": tokens}


async def _level(url: str, bodies: list[dict], concurrency: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def bounded(b):
            async with gate:
                return await _one(client, url, b)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(b) for b in bodies))
        wall = time.perf_counter() - t0
    ttft = np.array([r["ttft"] for r in results])
    lat = np.array([r["seconds"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(bodies), "requests_per_s": len(bodies) / wall,
            "tokens_per_s": tokens / wall, "ttft_p50": float(np.percentile(ttft, 50)),
            "ttft_p99": float(np.percentile(ttft, 99)), "latency_p50": float(np.percentile(lat, 50)),
            "latency_p99": float(np.percentile(lat, 99)), "errors": sum(r["status"] >= 400 for r in results)}


async def _soak(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    import httpx

    stop = time.monotonic() + seconds
    counts = {"requests": 0, "walked_away": 0, "5xx": 0, "4xx": 0}
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker(k):
            while time.monotonic() < stop:
                walk = rng.random() < 0.1
                r = await _one(client, url, bodies[(counts["requests"] + k) % len(bodies)], walk_away=walk)
                counts["requests"] += 1
                counts["walked_away"] += walk
                counts["5xx"] += r["status"] >= 500
                counts["4xx"] += 400 <= r["status"] < 500

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return counts


def run_serve_bench(run_dir: str, *, requests: int, levels: list[int], max_tokens: int, slots: int, chunk: int,
                    soak: float, soak_concurrency: int, out) -> dict:
    import jax

    from plutao.experiments.serve.served import load_served
    from plutao.model.decode import SlotDecoder, _completions, complete
    from plutao.model.engine import Engine
    from plutao.model.sampling import SamplingConfig
    from plutao.tokenizer.chat import prompt_ids, reply_stop_ids

    served = load_served([run_dir], slots)
    [s] = served.values()
    from plutao.train.run.lineage import load_run

    run = load_run(Path(run_dir))
    n = max(requests, max(levels))
    prompts = _prompts(run, n, max_tokens)
    bodies = [{"model": s.name, "messages": p, "max_tokens": max_tokens, "temperature": 1.0, "seed": i}
              for i, p in enumerate(prompts)]
    stops = reply_stop_ids(s.tokenizer)
    banned = s.tokenizer.unsampled_ids(stops, run.cfg.model.vocab_size)
    samplings = [SamplingConfig(temperature=1.0, max_new_tokens=max_tokens, seed=i, stop_ids=stops, banned_ids=banned)
                 for i in range(n)]
    ids = [prompt_ids(p, s.tokenizer) for p in prompts]
    tok = s.tokenizer
    for i in range(min(4, n)):  # (warm: the one-at-a-time loops' programs compiled before they are timed)
        complete(run.model, [ids[i]], samplings[i], eot_id=tok.eot_id, pad_id=tok.pad_id)
    t0 = time.perf_counter()
    generated = 0
    for p, sp in zip(ids[:requests], samplings[:requests]):
        generated += len(complete(run.model, [p], sp, eot_id=tok.eot_id, pad_id=tok.pad_id)[0].content)
    alone = time.perf_counter() - t0
    # The same loop without its per-call setup: one SlotDecoder, each request prefilled and decoded alone.
    decoder = SlotDecoder.of(run.model, eot_id=tok.eot_id, pad_id=tok.pad_id)
    t0 = time.perf_counter()
    for p, sp in zip(ids[:requests], samplings[:requests]):
        for _ in _completions(decoder, [p], [sp], chunk):
            pass
    reused = time.perf_counter() - t0
    baseline = {"requests": requests, "requests_per_s": requests / alone, "tokens_per_s": generated / alone,
                "one_decoder_tokens_per_s": generated / reused}
    best = max(baseline["tokens_per_s"], baseline["one_decoder_tokens_per_s"])
    print(f"one at a time (the plain sampler loop): {baseline['requests_per_s']:.2f} requests/s, "
          f"{baseline['tokens_per_s']:.0f} tokens/s; with one decoder kept: {baseline['one_decoder_tokens_per_s']:.0f} "
          "tokens/s", file=out, flush=True)
    engine = Engine({s.name: s.backend}, max_queue=4 * max(max(levels), soak_concurrency), chunk=chunk)
    from plutao.experiments.serve.api import create_app
    from plutao.experiments.serve.local import LocalServer

    local = LocalServer(create_app(served, engine, chunk=chunk))
    url = local.url
    table = []
    for c in levels:
        row = asyncio.run(_level(url, bodies[:max(requests, c)], c))
        row["speedup_tokens_per_s"] = row["tokens_per_s"] / best  # (against the faster one-at-a-time loop)
        table.append(row)
        print(f"concurrency {c:>3}: {row['requests_per_s']:6.2f} req/s, {row['tokens_per_s']:7.0f} tok/s "
              f"({row['speedup_tokens_per_s']:.1f}× one at a time), TTFT p50 {row['ttft_p50'] * 1e3:.0f} ms p99 "
              f"{row['ttft_p99'] * 1e3:.0f} ms, latency p50 {row['latency_p50']:.2f} s p99 {row['latency_p99']:.2f} s, "
              f"errors {row['errors']}", file=out, flush=True)
    result = {"run": str(run_dir), "device": str(jax.devices()[0].device_kind), "slots": slots, "chunk": chunk,
              "max_tokens": max_tokens, "one_at_a_time": baseline, "levels": table}
    if soak:
        rss0 = _rss_mb()
        counts = asyncio.run(_soak(url, bodies, soak_concurrency, soak))
        time.sleep(1.0)
        result["soak"] = counts | {"seconds": soak, "concurrency": soak_concurrency,
                                   "slots_in_use_after": engine.slots_in_use(), "queue_after": engine.queue_depth(),
                                   "rss_mb_start": rss0, "rss_mb_end": _rss_mb()}
        print(f"soak: {json.dumps(result['soak'])}", file=out, flush=True)
    local.stop()
    return result
