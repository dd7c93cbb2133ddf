"""Training: learning, exact resume (also after SIGKILL), gradient accumulation, step-indexed data."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forced_devices

from plutao.model.config import ModelConfig
from plutao.train.config.presets import PRESETS
from plutao.train.config.schema import Config, MeshConfig, OptimConfig, apply_overrides
from plutao.train.data.sources import Batches, Split
from plutao.train.loop import train
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel.sharding import make_mesh
from plutao.train.run.lineage import load_run
from plutao.train.step import Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(corpus: Path, **overrides) -> Config:
    layers = dict(PRESETS["tiny"]) | {"data.path": str(corpus), "train.log_every": 1} | overrides
    return apply_overrides(Config(), layers)


def test_tiny_model_overfits_one_batch():
    cfg = ModelConfig(vocab_size=32, context_length=32, n_layers=2, d_model=64, n_heads=4).resolved()
    optim = OptimConfig(lr=1e-2, warmup_steps=10, min_lr=1e-3, weight_decay=0.0)
    trainer = Trainer(cfg, make_optimizer(optim, 300, cfg), lr_schedule(optim, 300), make_mesh(MeshConfig()), seed=0)
    state = trainer.init_state()
    batch = np.random.default_rng(0).integers(0, 32, (4, 33)).astype(np.int32)
    for _ in range(300):
        state, metrics = trainer.train_step(state, batch)
    assert float(metrics["loss"]) < 0.05


def padded_translation_batch(lengths, L: int = 8, seed: int = 1) -> np.ndarray:
    """Rows of source (L ids, <eos>, padding) and target (<bos> n ids <eos>, padding, L + 1 ids):
    target row r carries lengths[r] + 1 loss-carrying tokens, the rest is padding (id 0)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((len(lengths), 2 * L + 1), np.int32)
    for r, n in enumerate(lengths):
        m = int(rng.integers(1, L))
        rows[r, :m] = rng.integers(11, 32, m)
        rows[r, m] = 3  # <eos>
        rows[r, L:L + n + 2] = [2, *rng.integers(11, 32, n), 3]  # <bos> ... <eos>
    return rows


def test_gradient_accumulation_equals_one_big_batch():
    from plutao.train.tasks import TokenIds, task_for_model

    cfg = ModelConfig(family="encoder_decoder", vocab_size=32, context_length=8, n_layers=1, d_model=32,
                      n_heads=2).resolved()
    objective = task_for_model(cfg, TokenIds(pad_id=0))
    # Plain SGD with a constant rate and no clipping, momentum or decay: params' = params - lr·gradient,
    # so the comparison sees the gradients themselves (Adam's m/√v amplifies round-off near zero).
    optim = OptimConfig(name="sgd", lr=0.1, warmup_steps=0, schedule="constant", momentum=0.0, weight_decay=0.0,
                        grad_clip=0.0)
    # Micro-batch i of 4 takes rows i and i + 4: 8 + 7 = 15, 1 + 1 = 2, 2 + 3 = 5 and 4 + 6 = 10 target
    # tokens. Only summing over micro-batches and dividing once by all 32 gives the big-batch gradient.
    lengths = [7, 0, 1, 3, 6, 0, 2, 5]
    batch = padded_translation_batch(lengths)
    micro = [batch[i::4] for i in range(4)]
    assert [int((m[:, 9:] != 0).sum()) for m in micro] == [15, 2, 5, 10]

    params, metrics, state = [], [], None
    for accum in (1, 4):
        trainer = Trainer(cfg, make_optimizer(optim, 10, cfg), lr_schedule(optim, 10), make_mesh(MeshConfig()), 0, accum,
                          objective)
        if state is None:  # (both trainers start from the same parameters: initialise once)
            state = trainer.init_state()
            start = jax.device_get(state["params"])
        first = jax.tree.map(jnp.copy, state)  # the step donates its state
        after, m = trainer.train_step(first, batch)
        metrics.append(jax.device_get(m))
        params.append(jax.device_get(after["params"]))

    @jax.jit
    def summed(p, rows):  # the gradient of one micro-batch's summed loss, and its token count
        def loss_sum(q):
            sums = objective.sums(trainer.model(q), objective.named(rows), None, train=False)  # no dropout, no smoothing
            return sums["loss"], sums["count"]
        return jax.grad(loss_sum, has_aux=True)(p)

    grads, counts = zip(*(summed(start, m) for m in micro))
    assert [float(c) for c in counts] == [15, 2, 5, 10]
    big_batch = jax.tree.map(lambda *g: sum(g) / sum(counts), *grads)
    mean_of_means = jax.tree.map(lambda *g: sum(gi / c for gi, c in zip(g, counts)) / len(g), *grads)
    right = jax.tree.map(lambda p, g: p - 0.1 * g, start, big_batch)
    wrong = jax.tree.map(lambda p, g: p - 0.1 * g, start, mean_of_means)
    # The batch discriminates: "average of micro-batch means" moves parameters far from the big batch.
    gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(right), jax.tree.leaves(wrong)))
    assert gap > 1e-3, gap
    for got in params:  # accum 1 (the big batch in one go) and accum 4 both take the big-batch step
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(right)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(metrics[1]["loss"], metrics[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[1]["grad_norm"], metrics[0]["grad_norm"], rtol=1e-5)


def test_loss_falls_on_tiny_shakespeare(shakespeare, tmp_path):
    cfg = tiny_config(shakespeare, **{"train.steps": 150, "train.eval_every": 0, "model.d_model": 64,
                                      "model.n_heads": 4, "model.context_length": 64, "train.batch_size": 16})
    summary = train(cfg, tmp_path / "run", quiet=True)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] > 3.8  # ≈ ln(vocab) at the start
    assert summary["val_loss"] < 2.8
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def final_params(run_dir: Path):
    return jax.device_get(load_run(run_dir).params)


def assert_same_params(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_resume_equals_uninterrupted_with_any_steps_per_dispatch(small_corpus, tmp_path):
    """Single steps straight through; blocks of 4 steps (cut at logs and checkpoints) stopped at step 7,
    off every boundary, then resumed in blocks of 3: the same parameters and logged figures, bit for bit."""
    overrides = {"train.steps": 23, "train.checkpoint_every": 10, "train.log_every": 5, "train.eval_every": 0,
                 "model.dropout": 0.1}
    train(tiny_config(small_corpus, **overrides, **{"train.steps_per_dispatch": 1}), tmp_path / "straight", quiet=True)
    first = train(tiny_config(small_corpus, **overrides, **{"train.steps_per_dispatch": 4, "train.stop_at_step": 7}),
                  tmp_path / "resumed", quiet=True)
    assert first["interrupted"] and first["step"] == 7
    train(tiny_config(small_corpus, **overrides, **{"train.steps_per_dispatch": 3}), tmp_path / "resumed", quiet=True)

    def logged(d):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                                                        .splitlines()) if r.get("split") == "train"]

    assert [s for s, *_ in logged(tmp_path / "straight")] == [5, 10, 15, 20, 23]
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"), atol=0)
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight")


TRAIN_SCRIPT = """
import sys
from pathlib import Path
from plutao.train.config.schema import Config, apply_overrides
from plutao.train.config.presets import PRESETS
from plutao.train.loop import train
layers = dict(PRESETS["tiny"]) | {{"data.path": {corpus!r}, "train.steps": 200, "train.checkpoint_every": 10}}
train(apply_overrides(Config(), layers), Path(sys.argv[1]), quiet=True)
"""


@pytest.fixture(scope="module")
def straight_run(small_corpus, tmp_path_factory):
    """The uninterrupted reference for the kill/terminate tests."""
    path = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run([sys.executable, "-c", TRAIN_SCRIPT.format(corpus=str(small_corpus)), str(path)], check=True,
                   capture_output=True)
    return path


def interrupt_after_first_checkpoint(small_corpus, run_dir: Path, sig: int) -> subprocess.CompletedProcess:
    script = TRAIN_SCRIPT.format(corpus=str(small_corpus))
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "10").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate()
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 200, f"the process finished before the signal arrived: {steps}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# (slow: tests/test_stages_cli.py resumes an SFT run after SIGKILL through the same loop)
@pytest.mark.slow
def test_resume_after_sigkill(small_corpus, tmp_path, straight_run):
    interrupt_after_first_checkpoint(small_corpus, tmp_path / "killed", signal.SIGKILL)
    subprocess.run([sys.executable, "-c", TRAIN_SCRIPT.format(corpus=str(small_corpus)), str(tmp_path / "killed")],
                   check=True, capture_output=True)
    assert_same_params(final_params(straight_run), final_params(tmp_path / "killed"))
    # Steps the killed process logged after its last checkpoint are dropped, not duplicated.
    def train_steps(d):
        return [r["step"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if r.get("split") == "train"]

    assert train_steps(tmp_path / "killed") == train_steps(straight_run)


# (slow: its fast siblings are test_first_use.py's SIGTERM mid-run, which saves, says how to resume and
# resumes, and test_resume_equals_uninterrupted_with_any_steps_per_dispatch for the exactness)
@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(small_corpus, tmp_path, straight_run):
    done = interrupt_after_first_checkpoint(small_corpus, tmp_path / "term", signal.SIGTERM)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Run the same command again to resume" in done.stderr
    subprocess.run([sys.executable, "-c", TRAIN_SCRIPT.format(corpus=str(small_corpus)), str(tmp_path / "term")],
                   check=True, capture_output=True)
    assert_same_params(final_params(straight_run), final_params(tmp_path / "term"))


def test_checkpoints_keep_latest_and_best(tmp_path):
    from plutao.train.run.checkpoint import Checkpoints

    ckpt = Checkpoints(tmp_path / "ck", keep=2)
    state = {"w": np.zeros(3, np.float32)}
    for step, val in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0]):
        ckpt.save(step, {"w": np.full(3, step, np.float32)}, {"val_loss": val, "train_seconds": float(step)})
    ckpt.close()
    assert sorted(Checkpoints(tmp_path / "ck").all_steps()) == [2, 4, 5]
    assert Checkpoints(tmp_path / "ck").metadata(4) == {"val_loss": 3.0, "train_seconds": 4.0}
    restored = Checkpoints(tmp_path / "ck").restore(2, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                                     state))
    np.testing.assert_array_equal(restored["w"], np.full(3, 2.0))


def test_batches_are_a_pure_function_of_seed_and_step():
    rng = np.random.default_rng(0)
    splits = [Split("a", rng.integers(0, 50, 5000), rng.integers(0, 50, 500)),
              Split("b", rng.integers(0, 50, 2000), rng.integers(0, 50, 300))]
    whole = Batches(splits, [3, 1], 16, 8, seed=5)
    again = Batches(splits, [3, 1], 16, 8, seed=5)
    np.testing.assert_array_equal(whole.train_rows(7), again.train_rows(7))
    assert not np.array_equal(whole.train_rows(7), whole.train_rows(8))
    assert not np.array_equal(whole.train_rows(7), Batches(splits, [3, 1], 16, 8, seed=6).train_rows(7))
    # Any split of the rows (one per device or process) materialises the same global batch.
    parts = [whole.train_rows(7, slice(i * 2, (i + 1) * 2)) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole.train_rows(7))
    # Rows are contiguous windows of T+1 tokens of one source.
    row = whole.train_rows(3)[0]
    assert row.shape == (17,)
    assert any(np.array_equal(s.train[i:i + 17], row) for s in splits for i in range(len(s.train) - 16))


def test_mixture_weights_and_epoch_report():
    rng = np.random.default_rng(0)
    # Sources use disjoint token ranges, so each row shows which source it came from.
    splits = [Split("big", rng.integers(0, 25, 40000), rng.integers(0, 25, 500)),
              Split("small", rng.integers(25, 50, 10000), rng.integers(25, 50, 500))]
    batches = Batches(splits, [3, 1], 8, 64, seed=0)
    rows = np.concatenate([batches.train_rows(step) for step in range(100)])
    share_small = np.mean(rows[:, 0] >= 25)
    assert share_small == pytest.approx(0.25, abs=0.03)
    epochs = batches.epochs_consumed(100)
    assert epochs["big"] == pytest.approx(100 * 64 * 8 * 0.75 / 40000)
    assert epochs["small"] == pytest.approx(100 * 64 * 8 * 0.25 / 10000)


def test_multi_device_data_parallel_matches_one_device(small_corpus, tmp_path):
    script = f"""
import json, sys
from pathlib import Path
import jax
from plutao.train.config.schema import Config, apply_overrides
from plutao.train.config.presets import PRESETS
from plutao.train.loop import train
assert jax.device_count() == 8, jax.devices()
base = dict(PRESETS["tiny"]) | {{"data.path": {str(small_corpus)!r}, "train.steps": 10, "train.log_every": 1,
    "train.batch_size": 16, "train.eval_every": 0, "train.checkpoint_every": 100}}
out = {{}}
# (eight devices in blocks of 5 steps, each device holding its rows of every step's batch, too)
for name, mesh, devices in [("one", {{"mesh.data": 1}}, jax.devices()[:1]), ("eight", {{"mesh.data": 8}}, None),
                            ("blocks", {{"mesh.data": 8, "train.log_every": 5}}, None)]:
    summary = train(apply_overrides(Config(), base | mesh), Path(sys.argv[1]) / name, devices=devices, quiet=True)
    rows = [json.loads(l) for l in (Path(sys.argv[1]) / name / "metrics.jsonl").read_text().splitlines()]
    out[name] = [r["loss"] for r in rows if r.get("split") == "train"]
print(json.dumps(out))
"""
    env = forced_devices(8)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(losses["one"]) == 10
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-5)
    assert losses["blocks"] == [losses["eight"][4], losses["eight"][9]]
