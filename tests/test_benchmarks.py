"""The benchmark commands on tiny shapes: `plutao bench-sizes` times the same model in plutao and in
PyTorch and reports their ratio; the accelerator check (`gpu_check --all`) runs end to end on CPU and
writes one JSON and one table."""

import json
import subprocess
import sys

import pytest

from plutao.experiments import gpu_check
from plutao.experiments.sizes_bench import SIZES, parse_sizes, run_bench_sizes
from plutao.train.config.errors import UserError


def test_sizes_are_named_or_given_as_shapes():
    assert parse_sizes("1m, 50m") == [SIZES["1m"], SIZES["50m"]]
    [size] = parse_sizes("2x32x2:16x4:3")
    assert (size.n_layers, size.d_model, size.n_heads, size.context, size.batch, size.steps) == (2, 32, 2, 16, 4, 3)
    with pytest.raises(UserError, match="LAYERSxWIDTHxHEADS"):
        parse_sizes("huge")
    with pytest.raises(UserError, match="empty"):
        parse_sizes(",")
    with pytest.raises(UserError, match="each number ≥ 1"):
        parse_sizes("2x32x2:16x4:0")


def test_bench_sizes_times_the_same_model_in_both_systems(small_corpus, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    del torch
    result = run_bench_sizes(parse_sizes("1x32x2:16x4:3"), data=str(small_corpus), compile=False,
                             plot=str(tmp_path / "sizes.png"))
    [row] = result["rows"]
    # The same architecture on both sides: the parameter counts agree exactly.
    assert row["plutao"]["params"] == row["torch_eager"]["params"]
    assert row["plutao"]["tokens_per_sec"] == pytest.approx(16 * 4 / row["plutao"]["ms_per_step"] * 1e3)
    assert set(row["profile"]["by_kind_ms"]) >= {"matmul"}
    assert (tmp_path / "sizes.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| 1x32x2:16x4:3 |" in table and f"{row['vs_torch_eager']:.2f}×" in table


def test_bench_sizes_refuses_a_missing_data_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        run_bench_sizes(parse_sizes("1m"), data=str(tmp_path / "missing.txt"), torch=False)


def test_accelerator_check_decodes_and_tabulates_on_cpu():
    """(The fast sibling of the next test: the training and decoding parts in-process, and the table.)"""
    result = {"preset": "tiny", "device": "cpu", "backend": "cpu", "seconds": 1.0,
              "train": gpu_check.run("tiny", [2], 1, "auto"), "decode": gpu_check.decode("tiny", [3], 4)}
    assert [r["generated_tokens"] for r in result["decode"]] == [12]
    table = gpu_check.table(result)
    assert "| batch 2 |" in table and "| 3 slots |" in table


@pytest.mark.slow
def test_accelerator_check_runs_everything_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "-m", "plutao.experiments.gpu_check", "--all", "--preset", "tiny",
                           "--batch-sizes", "2", "--steps", "2", "--slots", "1", "3", "--new-tokens", "4",
                           "--concurrency", "2", "--serve-tokens", "4", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["train"]] == [2]
    assert [r["slots"] for r in result["decode"]] == [1, 3]
    assert [r["generated_tokens"] for r in result["decode"]] == [4, 12]
    assert result["serve"]["errors"] == 0 and result["serve"]["tokens_per_sec"] > 0
    assert "| batch 2 |" in done.stdout and "| 3 slots |" in done.stdout and "| concurrency 2 |" in done.stdout
