"""Run outputs a person reads: metrics.jsonl, TensorBoard events, loss.png, and a throughput model."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, start_step: int = 0):
        """Resuming at start_step drops records past it (from steps a crash made the run redo)."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self._tb_ready = None
        if enabled:
            if self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= start_step]
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(self.path)
            # tensorboardX takes seconds to import (it imports PyTorch when installed): do it in the
            # background while the first step compiles.
            def open_writer():
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), flush_secs=10,
                                        purge_step=start_step + 1 if start_step else None)

            self._tb_ready = threading.Thread(target=open_writer, daemon=True)
            self._tb_ready.start()

    def _writer(self):
        if self._tb_ready is not None:
            self._tb_ready.join()
            self._tb_ready = None
        return self.tb

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step, split = record.get("step", 0), record.get("split")
        tb = self._writer()
        for k, v in record.items():
            if split and isinstance(v, (int, float)) and k not in ("step",):
                tb.add_scalar(f"{split}/{k}", v, step)
        if "sample" in record:
            tb.add_text("sample", record["sample"], step)

    def close(self) -> None:
        if self.enabled and self._writer() is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) of the train and val rows. With label smoothing the train curve is the plain
    cross-entropy (`loss_unsmoothed`), which is what val measures."""
    train = [(r["step"], r.get("loss_unsmoothed", r["loss"])) for r in records
             if r.get("split") == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val" and "loss" in r]
    return train, val


def plot_losses(run_dir: Path) -> Path | None:
    """Train and val loss against step, written to RUN_DIR/loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = loss_curves(read_metrics(run_dir))
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out



def plot_rewards(run_dir: Path) -> Path | None:
    """An RL run's curves against RL step (RUN_DIR/rewards.png): reward-model score and gold reward of
    the rollouts, KL to the reference, and held-out greedy accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train" and "kl" in r]
    if not train:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    steps = [r["step"] for r in train]
    for key, label in (("rm_score", "reward-model score"), ("gold_reward", "gold reward (rollouts)")):
        if key in train[0]:
            left.plot(steps, [r[key] for r in train], label=label, lw=1)
    val = [(r["step"], r["accuracy"]) for r in records if r.get("split") == "val" and "accuracy" in r]
    if val:
        left.plot(*zip(*val), "o-", ms=3, label="held-out greedy accuracy")
    left.set_xlabel("RL step")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(steps, [r["kl"] for r in train], color="C3", lw=1)
    right.set_xlabel("RL step")
    right.set_ylabel("KL(π ‖ π_ref) per reply (nats)")
    right.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / "rewards.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_overoptimization(run_dirs: list[Path], out: Path) -> Path | None:
    """Gao et al.'s picture for RL runs side by side: the reward-model score and the gold reward of the
    rollouts against KL(π ‖ π_ref) per reply, one line per run (its β in the legend), written to `out`."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    drawn = 0
    for i, run_dir in enumerate(run_dirs):
        train = [r for r in read_metrics(run_dir) if r.get("split") == "train" and "kl" in r]
        if not train:
            continue
        try:
            beta = json.loads((Path(run_dir) / "config.json").read_text())["rl"]["beta"]
        except (OSError, KeyError, ValueError):
            beta = "?"
        label = f"{Path(run_dir).name} (β={beta})"
        kl = np.asarray([r["kl"] for r in train])
        for ax, key in ((left, "rm_score"), (right, "gold_reward")):
            if key in train[0]:
                y = np.asarray([r[key] for r in train])
                ax.plot(kl, y, ".", color=f"C{i}", ms=3, alpha=0.35)
                # (a running mean over 8 RL steps: one rollout batch's rewards are noisy)
                w = min(8, len(y))
                smooth = np.convolve(y, np.ones(w) / w, mode="valid")
                ax.plot(np.convolve(kl, np.ones(w) / w, mode="valid"), smooth, "-", color=f"C{i}", lw=2, label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    for ax, what in ((left, "reward-model score (proxy)"), (right, "gold reward (the world's checker)")):
        ax.set_xlabel("KL(π ‖ π_SFT) per reply (nats)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("rollout rewards against KL to the SFT policy")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out

# Dense bf16 matmul peaks as the vendors publish them, FLOP/s per device (first match of the device kind).
PUBLISHED_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)


def published_peak(device_kind: str, dtype) -> float | None:
    """A device's published dense peak for this compute dtype, when known (bf16 only)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return None
    return next((flops for name, flops in PUBLISHED_BF16_PEAK if name in device_kind), None)


def measure_matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of a square matmul on the default device, times the device count (tokens/s is global, so
    is the peak). n defaults to a size the device is busy with: 1024 on a CPU (~10 ms), 8192 on an
    accelerator (where 1024³ measures dispatch, not arithmetic)."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best * jax.device_count()


def device_peak_flops(dtype) -> tuple[float, str]:
    """(peak FLOP/s over all devices, where it comes from): the published figure when the device and
    dtype are known, else a matmul measured now."""
    kind = jax.devices()[0].device_kind
    published = published_peak(kind, dtype)
    if published:
        return published * jax.device_count(), f"published {jnp.dtype(dtype).name} peak of {kind}"
    return measure_matmul_peak(dtype), f"a {jnp.dtype(dtype).name} matmul measured on {kind}"
