"""Promises README makes that no other test checks: sampling stops at <|endoftext|>, raising
train.steps continues a finished run, trials that differ only by seed run one compiled program, and
TensorBoard events carry the logged scalars."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from plutao.experiments.cli import main
from plutao.model.config import ModelConfig
from plutao.train.config.schema import Config, MeshConfig, OptimConfig
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel.sharding import make_mesh
from plutao.train.step import Trainer

FAST = ["train.peak_flops=1e11", "train.sample_every=0"]
EOT = "<|endoftext|>"


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "train"]


# --- sampling stops at <|endoftext|> ----------------------------------------------------------------

@pytest.fixture(scope="module")
def eot_run(tmp_path_factory):
    """A tiny GPT trained on documents that are all "hello world": after "d" comes <|endoftext|>,
    the separator between documents, with near certainty."""
    root = tmp_path_factory.mktemp("eot")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": "hello world"}) + "\n" for _ in range(400)))
    run = root / "run"
    assert main(["train", "tiny", f"data.path={corpus}", "train.steps=120", "train.eval_every=0",
                 "train.checkpoint_every=120", "optim.lr=1e-2", "--workdir", str(run), "--quiet", *FAST]) == 0
    return run


def test_sampling_stops_at_end_of_text(capsys, eot_run):
    base = ["sample", str(eot_run), "--prompt", "hello w", "--temperature", "0", "--max-new-tokens", "40"]
    assert main(base) == 0
    assert capsys.readouterr().out == "hello world\n"  # stopped at <|endoftext|>, which is not printed
    assert main(base + ["--stream"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    # Stochastic sampling stops there too.
    assert main([*base[:4], "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    # --no-stop goes on through the separator for all 40 tokens.
    assert main(base + ["--no-stop"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hello world{EOT}hello world{EOT}"), out
    from plutao.tokenizer import load_tokenizer

    tok = load_tokenizer(eot_run / "tokenizer")
    continuation = out[len("hello w"):].rstrip("\n")
    assert len(tok.encode(continuation.replace(EOT, ""))) + continuation.count(EOT) == 40


def test_streaming_a_word_level_run_keeps_the_spaces(capsys, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": "the cat sat on the mat"}) + "\n" for _ in range(300)))
    run = tmp_path / "run"
    assert main(["train", "tiny", f"data.path={corpus}", "data.tokenizer=word", "train.steps=40",
                 "train.eval_every=0", "train.checkpoint_every=40", "optim.lr=1e-2", "--workdir", str(run), "--quiet",
                 *FAST]) == 0
    capsys.readouterr()
    base = ["sample", str(run), "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "12", "--no-stop"]
    assert main(base) == 0
    printed = capsys.readouterr().out
    assert main(base + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == printed and " sat on " in streamed


# --- raising train.steps continues a finished run -------------------------------------------------

def test_raising_train_steps_continues_a_finished_run(capsys, tmp_path, small_corpus):
    run = tmp_path / "run"
    argv = ["train", "tiny", f"data.path={small_corpus}", "train.log_every=1", "train.eval_every=0",
            "train.checkpoint_every=100", "--workdir", str(run), "--json", "--quiet", *FAST]
    first = run_json(capsys, [*argv, "train.steps=10"])
    assert first["step"] == 10 and not first.get("interrupted")
    before = train_records(run)
    assert [r["step"] for r in before] == list(range(1, 11))
    # Re-running with the same length only reports.
    again = run_json(capsys, [*argv, "train.steps=10"])
    assert again["step"] == 10 and train_records(run) == before
    second = run_json(capsys, [*argv, "train.steps=16"])
    assert second["step"] == 16
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(1, 17))  # 11..16 appended exactly once
    assert records[:10] == before  # the first invocation's records are untouched
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 16
    assert (run / "checkpoints" / "16").is_dir()
    # It continued from step 10 (not from scratch): the loss at step 11 is near step 10's, far below step 1's.
    loss = {r["step"]: r["loss"] for r in records}
    assert loss[11] < loss[1] - 0.5 and abs(loss[11] - loss[10]) < 0.3, loss
    # The schedule is recomputed for 16 steps: the decayed rate rises again, to the 16-step schedule's value.
    optim = Config.from_dict(json.loads((run / "config.json").read_text())).optim
    lr = {r["step"]: r["lr"] for r in records}
    assert lr[11] > lr[10]
    assert lr[10] == pytest.approx(float(lr_schedule(optim, 10)(9)), rel=1e-6)  # a record's lr: its step's
    for step in range(11, 17):
        assert lr[step] == pytest.approx(float(lr_schedule(optim, 16)(step - 1)), rel=1e-6)


# --- trials that differ only by seed run the same compiled program -------------------------------

def test_the_seed_is_a_traced_argument_of_the_step():
    cfg = ModelConfig(vocab_size=32, context_length=16, n_layers=1, d_model=32, n_heads=2, dropout=0.1).resolved()
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    batch = np.random.default_rng(0).integers(0, 32, (4, 17)).astype(np.int32)
    trainers = [Trainer(cfg, make_optimizer(optim, 10, cfg), lr_schedule(optim, 10), make_mesh(MeshConfig()), seed)
                for seed in (0, 1)]
    state = trainers[0].init_state()
    texts = [t.train_step.lower(state, batch).as_text() for t in trainers]
    assert texts[0] == texts[1]  # the same program, so the same compilation-cache key
    # One jitted step serves both seeds (one compilation), and the seed really reaches the program:
    # the same state and batch get other dropout masks.
    step = trainers[0].train_step.jitted
    named = trainers[0].active_task.named(batch)
    after = [jax.device_get(step(jax.tree.map(lambda x: x.copy(), state), named, np.int32(seed))[0]["params"])
             for seed in (0, 1)]
    assert step._cache_size() == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[0]), jax.tree.leaves(after[1])))


def _cache_entries(cache: Path) -> set[str]:
    return {p.name for p in (cache / "xla").rglob("*") if p.is_file() and not p.name.endswith("-atime")}


def test_trials_differing_only_by_seed_add_nothing_to_the_compilation_cache(tmp_path, small_corpus):
    from plutao.experiments.sweep import compilation_cache_env

    cache = tmp_path / "cache"
    env = {**os.environ, "PLUTAO_CACHE": str(cache)}
    env |= compilation_cache_env(tmp_path)  # (reads PLUTAO_CACHE from os.environ: point it at ours)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache / "xla")

    def trial(name, *overrides):
        cmd = [sys.executable, "-m", "plutao.experiments.cli", "train", "tiny", f"data.path={small_corpus}",
               "train.steps=4", "train.eval_every=2", "train.checkpoint_every=100", "train.log_every=2",
               "model.dropout=0.1",  # (without dropout the step would not use its seed at all)
               "--workdir", str(tmp_path / name), "--quiet", *FAST, *overrides]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return _cache_entries(cache)

    first = trial("seed0", "train.seed=0")
    assert first, "the persistent compilation cache was not written"
    assert trial("seed1", "train.seed=1") == first  # every program came from the cache
    # The check can fail: another learning rate is another program, with entries of its own.
    assert trial("other-lr", "train.seed=0", "optim.lr=1e-2") - first


# --- TensorBoard events ---------------------------------------------------------------------------

def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TFRecord event files under tb_dir: {tag: {step: value}}, with each record's
    framing and CRCs checked."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {tb_dir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked(body)
            pos += 16 + length
            event = Event.FromString(body)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_events_hold_the_logged_scalars(capsys, tmp_path, small_corpus):
    run = tmp_path / "run"
    run_json(capsys, ["train", "tiny", f"data.path={small_corpus}", "train.steps=20", "train.log_every=5",
                      "train.eval_every=10", "train.checkpoint_every=100", "--workdir", str(run), "--json",
                      "--quiet", *FAST])
    scalars = read_scalars(run / "tb")
    logged = {r["step"]: r for r in train_records(run)}
    assert sorted(logged) == [5, 10, 15, 20]
    assert sorted(scalars["train/loss"]) == [5, 10, 15, 20]
    for step, record in logged.items():  # float32 in the event file
        assert scalars["train/loss"][step] == pytest.approx(record["loss"], rel=1e-6)
        assert scalars["train/lr"][step] == pytest.approx(record["lr"], rel=1e-6)
    val = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if r.get("split") == "val"}
    assert sorted(scalars["val/loss"]) == sorted(val) == [10, 20]
    for step, loss in val.items():
        assert scalars["val/loss"][step] == pytest.approx(loss, rel=1e-6)
