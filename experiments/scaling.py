"""`plutao bench-scaling`: compile time against depth (unrolled vs scanned layers), and the peak host
memory of a sharded training step on 8 forced devices against 1.

Figures, not tests: each configuration runs in a fresh subprocess so compilation caches and memory
high-water marks do not leak between them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

COMPILE_SCRIPT = r"""
import json, sys, time
import jax, numpy as np
from plutao.model.config import ModelConfig
from plutao.train.config.schema import OptimConfig, MeshConfig
from plutao.train.optim import make_optimizer, lr_schedule
from plutao.train.parallel.sharding import make_mesh, batch_sharding
from plutao.train.step import Trainer
layers, scan = int(sys.argv[1]), sys.argv[2] == "1"
cfg = ModelConfig(vocab_size=256, context_length=128, n_layers=layers, d_model=256, n_heads=8, scan_layers=scan)
optim = OptimConfig()
trainer = Trainer(cfg.resolved(), make_optimizer(optim, 100, cfg), lr_schedule(optim, 100), make_mesh(MeshConfig()), 0)
state = trainer.abstract_sharded_state()
batch = jax.ShapeDtypeStruct((8, 129), np.int32, sharding=batch_sharding(trainer.mesh))
t = time.perf_counter()
trainer.train_step.lower(state, batch).compile()
print(json.dumps({"layers": layers, "scan": scan, "compile_seconds": time.perf_counter() - t}))
"""

MEMORY_SCRIPT = r"""
import json, resource, sys
import jax, numpy as np
from plutao.model.config import ModelConfig
from plutao.train.config.schema import OptimConfig, MeshConfig
from plutao.train.optim import make_optimizer, lr_schedule
from plutao.train.parallel.sharding import make_mesh
from plutao.train.step import Trainer, global_batch
mesh_cfg = MeshConfig(data=1, fsdp=-1)
cfg = ModelConfig(vocab_size=256, context_length=256, n_layers=8, d_model=512, n_heads=8).resolved()
optim = OptimConfig()
trainer = Trainer(cfg, make_optimizer(optim, 100, cfg), lr_schedule(optim, 100), make_mesh(mesh_cfg), 0)
state = trainer.init_state()
tokens = np.random.default_rng(0).integers(0, 256, (16, 257)).astype(np.int32)
for _ in range(3):
    state, m = trainer.train_step(state, global_batch(tokens, trainer.mesh))
jax.block_until_ready(m)
print(json.dumps({"devices": jax.device_count(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(script: str, args: list[str], devices: int = 1) -> dict:
    env = os.environ | {"JAX_PLATFORMS": "cpu",
                        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_scaling(depths=(4, 16, 48)) -> dict:
    compile_rows = [_run(COMPILE_SCRIPT, [str(d), str(int(scan))]) for d in depths for scan in (False, True)]
    memory_rows = [_run(MEMORY_SCRIPT, [], devices=n) for n in (1, 8)]
    print("compile time of one training step (d_model 256, context 128, batch 8, AdamW), seconds:")
    print(f"  {'layers':>6}  {'unrolled':>9}  {'scanned':>8}")
    for d in depths:
        row = {r["scan"]: r["compile_seconds"] for r in compile_rows if r["layers"] == d}
        print(f"  {d:>6}  {row[False]:9.1f}  {row[True]:8.1f}")
    print("peak host memory (RSS) of 3 training steps, 8 layers × 512, batch 16 × 256, FSDP over all devices:")
    for r in memory_rows:
        print(f"  {r['devices']} device(s): {r['peak_rss_mib']:,.0f} MiB")
    return {"compile": compile_rows, "memory": memory_rows}
