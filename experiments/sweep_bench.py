"""`plutao bench-sweep`: what a sweep costs beyond its training steps.

Runs a 4-trial sweep (2 variants × 2 seeds, one trial at a time) twice into fresh directories: once
with an empty persistent compilation cache and once with the cache the first run filled. Reports the
time from `plutao sweep` to the first trial's first step, each trial's compile time, and the share
of the sweep's wall time spent outside training steps (process start, imports, data, compilation,
evaluation, checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from plutao.experiments.sweep import sweep
from plutao.experiments.sweep_spec import SweepSpec


def _measure(sweep_dir: Path, steps: int, say) -> dict:
    spec = SweepSpec(base=None, overrides={
        "model.n_layers": 2, "model.d_model": 64, "model.context_length": 64, "train.batch_size": 16,
        "train.steps": steps, "train.eval_every": max(steps // 3, 1), "train.eval_batches": 5,
        "train.sample_every": 0, "train.checkpoint_every": steps, "train.log_every": 10, "train.peak_flops": 1e11},
        ablations={"learned": {"model.positions": "learned"}, "rotary": {"model.positions": "rotary"}}, seeds=2)
    t0 = time.time()
    result = sweep(spec, sweep_dir, {}, log=lambda m: None)
    wall = time.time() - t0
    trials = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("trials/*/trial.json"))]
    summaries = [t["summary"] for t in trials]
    in_steps = sum(s["steps_seconds"] for s in summaries)
    first = min(s["first_step_unix"] for s in summaries)
    out = {"wall_seconds": wall, "steps_seconds": in_steps, "outside_steps_share": 1 - in_steps / wall,
           "to_first_step_seconds": first - result["started_unix"],
           "compile_seconds": [round(s["compile_seconds"], 2) for s in summaries],
           "trial_wall_seconds": [round(t["wall_seconds"], 1) for t in trials]}
    say(f"  wall {wall:.1f} s, in training steps {in_steps:.1f} s → {out['outside_steps_share']:.1%} outside steps; "
        f"sweep start → first step {out['to_first_step_seconds']:.1f} s; compile per trial (s): "
        f"{out['compile_seconds']}; trial wall (s): {out['trial_wall_seconds']}")
    return out


def run_sweep_bench(steps: int = 300, out=sys.stdout) -> dict:
    def say(msg):
        print(msg, file=out, flush=True)

    root = Path(tempfile.mkdtemp(prefix="plutao-sweep-bench-"))
    say(f"4 trials × {steps} steps (2 variants × 2 seeds), one at a time; scratch in {root}")
    # An empty cache (tokenized data and compiled programs) for the first sweep; the second reuses it.
    previous = os.environ.get("PLUTAO_CACHE")
    os.environ["PLUTAO_CACHE"] = str(root / "cache")
    try:
        say("cold (empty caches):")
        cold = _measure(root / "cold", steps, say)
        say("warm (the same sweep in a new directory, with the caches the first one filled):")
        warm = _measure(root / "warm", steps, say)
    finally:
        if previous is None:
            os.environ.pop("PLUTAO_CACHE")
        else:
            os.environ["PLUTAO_CACHE"] = previous
        shutil.rmtree(root, ignore_errors=True)
    return {"steps": steps, "cold": cold, "warm": warm}
