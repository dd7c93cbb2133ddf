"""Several local processes joined by jax.distributed (gloo over loopback), and resume across host counts."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import forced_devices

from plutao.experiments.launch import free_port
from plutao.train.run.lineage import load_run


def run(args: list[str], devices: int = 4, check: bool = True,
        tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = forced_devices(devices) | {"JAX_PLATFORMS": "cpu"}
    if tmpdir is not None:  # where `plutao launch` keeps its per-process logs
        tmpdir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    result = subprocess.run([sys.executable, "-m", "plutao.experiments", *args], env=env, capture_output=True,
                            text=True, check=False)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "tiny", f"data.path={corpus}", "train.steps=20", "train.checkpoint_every=10",
            "train.log_every=1", "train.eval_every=10", "--workdir", str(run_dir), "--quiet", *extra]


def two_by_two(args: list[str]) -> list[str]:
    return ["launch", "--local-processes", "2", "--devices-per-process", "2", "--", *args]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


def params(run_dir: Path):
    return jax.tree.leaves(jax.device_get(load_run(run_dir).params))


@pytest.fixture(scope="module")
def one_by_four(small_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("mh") / "1x4"
    run(train_args(small_corpus, path))
    return path


def test_two_processes_match_one_process(small_corpus, tmp_path, one_by_four):
    run(two_by_two(train_args(small_corpus, tmp_path / "2x2")), tmpdir=tmp_path / "tmp")
    assert not list((tmp_path / "tmp").glob("plutao-launch-*"))  # the launcher's logs go once all succeeded
    assert len(losses(tmp_path / "2x2")) == 20
    np.testing.assert_allclose(losses(tmp_path / "2x2"), losses(one_by_four), rtol=1e-5)
    # Only process 0 writes run files.
    assert not list((tmp_path / "2x2").glob("tokenizer.tmp-*"))
    assert len((tmp_path / "2x2" / "metrics.jsonl").read_text().splitlines()) == len(
        (one_by_four / "metrics.jsonl").read_text().splitlines())


def test_a_failed_launch_keeps_its_logs_and_says_where(tmp_path):
    result = run(two_by_two(["train", "tiny", "optim.lrr=1", "--workdir", str(tmp_path / "x")]), check=False,
                 tmpdir=tmp_path / "tmp")
    assert result.returncode == 2
    kept = list((tmp_path / "tmp").glob("plutao-launch-*"))
    assert len(kept) == 1 and (kept[0] / "process-1.log").is_file()
    assert "plutao launch: process " in result.stderr and str(kept[0]) in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


# (the reverse direction repeats the same mechanism; it runs with `-m slow`)
@pytest.mark.slow  # (test_two_processes_match_one_process covers two processes; data is step-indexed)
@pytest.mark.parametrize("first,second", [("2x2", "1x4"), ("1x4", "2x2")])
def test_resume_across_process_counts(small_corpus, tmp_path, one_by_four, first, second):
    run_dir = tmp_path / f"{first}-then-{second}"
    wrap = {"2x2": two_by_two, "1x4": lambda a: a}
    run(wrap[first](train_args(small_corpus, run_dir, "train.stop_at_step=10")))
    assert [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()] == [10]
    run(wrap[second](train_args(small_corpus, run_dir)))
    np.testing.assert_allclose(losses(run_dir), losses(one_by_four), rtol=1e-5)
    for a, b in zip(params(run_dir), params(one_by_four)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_unreachable_coordinator_is_a_one_line_error(small_corpus, tmp_path):
    result = run(["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1",
                  "--init-timeout", "2", *train_args(small_corpus, tmp_path / "x")], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("plutao: error: cannot reach the coordinator at 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
