"""Sweeps: isolated resumable trials, failures recorded, SIGINT safety, deterministic reports."""

import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plutao.experiments.cli import main
from plutao.experiments.report import report
from plutao.experiments.sweep import expand, pending, variants
from plutao.experiments.sweep_spec import SweepSpec, load_spec

GOLDENS = Path(__file__).parent / "goldens" / "report"
FAST = ["train.eval_every=10", "train.checkpoint_every=10", "train.log_every=5", "train.peak_flops=1e11"]


def statuses(sweep_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["status"] for p in sorted(sweep_dir.glob("trials/*/trial.json"))}


def launched(sweep_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["launched_unix"]
            for p in sorted(sweep_dir.glob("trials/*/trial.json"))}


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, small_corpus):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "grid"
    argv = ["sweep", "tiny", "--workdir", str(sweep_dir), "--parallel", "2", "--grid", "optim.lr=1e-3,3e-3",
            "--grid", "model.norm=pre,post", f"data.path={small_corpus}", "train.steps=30", *FAST]
    assert main(argv) == 0
    return sweep_dir, argv


def test_a_grid_sweep_runs_every_trial_and_reports(grid_sweep):
    sweep_dir, _ = grid_sweep
    assert statuses(sweep_dir) == {"lr=0.001_norm=post": "done", "lr=0.001_norm=pre": "done",
                                   "lr=0.003_norm=post": "done", "lr=0.003_norm=pre": "done"}
    for trial in sweep_dir.glob("trials/*"):  # each trial is a complete run directory of its own
        assert (trial / "config.json").is_file() and (trial / "metrics.jsonl").is_file()
        config = json.loads((trial / "config.json").read_text())
        assert config["train"]["steps"] == 30
    out = sweep_dir / "report"
    for name in ("report.md", "results.csv", "loss_curves.png", "heatmap.png", "val_loss_vs_optim_lr.png",
                 "val_loss_vs_model_norm.png"):
        assert (out / name).is_file(), name
    table = (out / "report.md").read_text()
    assert table.count("| lr=") == 4


def test_rerunning_starts_nothing_and_a_deleted_trial_runs_again(grid_sweep):
    sweep_dir, argv = grid_sweep
    before = launched(sweep_dir)
    assert main(argv) == 0
    assert launched(sweep_dir) == before  # no trial started again
    shutil.rmtree(sweep_dir / "trials" / "lr=0.003_norm=post")
    assert main(argv) == 0
    after = launched(sweep_dir)
    assert {k for k in after if after[k] != before.get(k)} == {"lr=0.003_norm=post"}
    assert statuses(sweep_dir)["lr=0.003_norm=post"] == "done"


def test_a_bad_override_fails_its_trial_only(capsys, tmp_path, small_corpus):
    sweep_dir = tmp_path / "bad"
    code = main(["sweep", "tiny", "--workdir", str(sweep_dir), "--grid", "model.norm=pre,sideways",
                 f"data.path={small_corpus}", "train.steps=10", *FAST])
    assert code == 1  # the sweep finished, but not every trial did
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("trials/*/trial.json")}
    assert records["norm=pre"]["status"] == "done"
    bad = records["norm=sideways"]
    assert bad["status"] == "failed"
    assert bad["error"] == "model.norm='sideways' is not allowed; use one of pre | post"
    assert "sideways" in (sweep_dir / "report" / "report.md").read_text()
    # Failed trials are not retried unless asked.
    assert main(["sweep", "tiny", "--workdir", str(sweep_dir), "--grid", "model.norm=pre,sideways",
                 f"data.path={small_corpus}", "train.steps=10", *FAST]) == 1
    assert json.loads((sweep_dir / "trials/norm=sideways/trial.json").read_text())["launched_unix"] == \
        bad["launched_unix"]


def test_a_bad_shared_override_is_a_one_line_error_before_any_trial(capsys, tmp_path):
    code = main(["sweep", "tiny", "--workdir", str(tmp_path / "s"), "--grid", "optim.lr=1e-3", "optim.lrr=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("plutao: error: unknown config key 'optim.lrr'") and "\n" not in err
    assert not (tmp_path / "s").exists()


def test_sigint_keeps_finished_trials_and_leaves_running_ones_resumable(tmp_path, small_corpus):
    sweep_dir = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "plutao.experiments.cli", "sweep", "tiny", "--workdir", str(sweep_dir),
           "--zip", "train.steps=20,5000", f"data.path={small_corpus}", "--no-report", *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    short, long = sweep_dir / "trials" / "steps=20", sweep_dir / "trials" / "steps=5000"
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = long / "metrics.jsonl"
        if metrics.is_file() and any('"step": 20' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the long trial never reached step 20")
    finished = (short / "trial.json").read_text()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert json.loads(finished)["status"] == "done" and (short / "trial.json").read_text() == finished
    record = json.loads((long / "trial.json").read_text())
    assert record["status"] == "interrupted"
    checkpoints = [int(p.name) for p in (long / "checkpoints").iterdir() if p.name.isdigit()]
    assert checkpoints and max(checkpoints) >= 20
    spec = SweepSpec(base="tiny", zip={"train.steps": [20, 5000]})
    same_cli = dict(o.split("=", 1) for o in [f"data.path={small_corpus}", *FAST])
    todo, done = pending(expand(spec, sweep_dir, same_cli), retry_failed=False)
    assert [t.name for t in todo] == ["steps=5000"] and [t.name for t in done] == ["steps=20"]
    # The same directory with other settings is refused rather than passed off as this spec's result.
    with pytest.raises(Exception, match="was run with other settings"):
        pending(expand(spec, sweep_dir, {}), retry_failed=False)


def test_spec_files_expand_grids_zips_ablations_seeds_and_random_search(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("""
base: tiny
overrides: {train.steps: 30}
ablations:
  baseline: {}
  post-norm: {model.norm: post}
  lstm: {model.family: lstm}
seeds: 2
""")
    spec = load_spec(spec_path)
    trials = expand(spec, tmp_path / "s", {"optim.lr": "1e-3"})
    assert [t.name for t in trials] == ["baseline-seed0", "baseline-seed1", "post-norm-seed0", "post-norm-seed1",
                                        "lstm-seed0", "lstm-seed1"]
    assert trials[3].overrides == {"train.steps": 30, "optim.lr": "1e-3", "model.norm": "post", "train.seed": 1}
    zipped = SweepSpec(zip={"model.n_layers": [2, 4], "model.d_model": [64, 128]})
    assert [p for _, p in variants(zipped)] == [{"model.n_layers": 2, "model.d_model": 64},
                                                {"model.n_layers": 4, "model.d_model": 128}]
    rnd = SweepSpec(random={"budget": 5, "seed": 3, "params": {"optim.lr": {"loguniform": [1e-4, 1e-2]},
                                                               "model.norm": {"choice": ["pre", "post"]}}})
    first, again = variants(rnd), variants(rnd)
    assert first == again and len(first) == 5
    assert all(1e-4 <= p["optim.lr"] <= 1e-2 and p["model.norm"] in ("pre", "post") for _, p in first)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {optim.lr: [1e-3]}\nseeds: 2\nparalel: 2\n")
    with pytest.raises(Exception, match="unknown sweep key 'paralel'; did you mean parallel"):
        load_spec(bad)


def _fixture_sweep(root: Path) -> Path:
    """Run directories as a sweep leaves them, written by hand: 3 variants × 3 seeds, one failure."""
    losses = {"lr=0.001": [2.10, 2.14, 2.12], "lr=0.003": [2.01, 2.03, 2.02], "lr=0.01": [2.30, None, 2.26]}
    for variant, per_seed in losses.items():
        for seed, final in enumerate(per_seed):
            d = root / "trials" / f"{variant}-seed{seed}"
            d.mkdir(parents=True)
            record = {"variant": variant, "params": {"optim.lr": float(variant.split("=")[1])}, "seed": seed,
                      "status": "done" if final is not None else "failed", "wall_seconds": 60.0 + seed,
                      "summary": {"params": 123456, "tokens_per_sec": 5000.0 + 100 * seed} if final else None}
            if final is None:
                record["error"] = "train.steps must be ≥ 1, got 0"
            (d / "trial.json").write_text(json.dumps(record))
            lines = []
            if final is not None:
                for step, loss in ((100, final + 0.5), (200, final + 0.1), (300, final)):
                    lines.append({"step": step, "split": "train", "loss": loss + 0.05, "tokens_per_sec": 5000.0})
                    lines.append({"step": step, "split": "val", "loss": loss})
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_reports_are_deterministic_and_match_the_goldens(tmp_path):
    sweep_dir = _fixture_sweep(tmp_path / "fixture")
    a = report(sweep_dir, tmp_path / "a")
    b = report(sweep_dir, tmp_path / "b")
    for name in ["report.md", "results.csv"] + [Path(p).name for p in a["plots"]]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert [r["variant"] for r in a["ranking"]] == ["lr=0.003", "lr=0.001", "lr=0.01"]
    assert "significant at the 95% level" in a["significance"]
    assert b["plots"] and all(Path(p).stat().st_size > 1000 for p in b["plots"])
    produced = {name: (tmp_path / "a" / name).read_text() for name in ("report.md", "results.csv")}
    if os.environ.get("PLUTAO_UPDATE_GOLDENS"):
        # Rewriting the goldens checks nothing: say what changed and skip, never pass.
        GOLDENS.mkdir(parents=True, exist_ok=True)
        changed = [n for n, text in produced.items()
                   if not (GOLDENS / n).is_file() or (GOLDENS / n).read_text() != text]
        for name in produced:
            shutil.copy(tmp_path / "a" / name, GOLDENS / name)
        pytest.skip(f"PLUTAO_UPDATE_GOLDENS: rewrote {GOLDENS} (changed: {', '.join(changed) or 'none'}); "
                    "run again without it to compare")
    for name, text in produced.items():
        golden = (GOLDENS / name).read_text()  # the checked-in file, written by nothing in this test
        assert text == golden, "".join(difflib.unified_diff(golden.splitlines(True), text.splitlines(True),
                                                            str(GOLDENS / name), "produced"))


def test_optuna_search_records_every_trial_and_resumes_its_study(tmp_path, small_corpus):
    sweep_dir = tmp_path / "optuna"
    argv = ["sweep", "tiny", "--workdir", str(sweep_dir), "--optuna", "--random", "optim.lr=loguniform:1e-4:3e-2",
            "--budget", "3", f"data.path={small_corpus}", "train.steps=20", "--no-report", *FAST]
    assert main(argv) == 0
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("trials/optuna-*/trial.json"))]
    assert len(records) == 3 and all(r["status"] in ("done", "pruned") for r in records)
    assert all(1e-4 <= r["params"]["optim.lr"] <= 3e-2 for r in records)
    assert (sweep_dir / "optuna.db").is_file()
    assert main(argv) == 0  # the study already has its 3 trials: nothing new runs
    assert len(list(sweep_dir.glob("trials/optuna-*"))) == 3


def test_a_sweep_stopped_by_sigterm_exits_143_and_by_sigint_130():
    """The exit code names the signal that stopped the sweep (the SIGINT case runs for real above)."""
    from plutao.experiments.commands.sweeps import _sweep_exit
    from plutao.experiments.sweep import Runner

    runner = Runner(SweepSpec(base="tiny"), Path("unused"), print)
    runner.stop_all(signal.SIGTERM)
    assert runner.stopping and runner.signal == signal.SIGTERM
    assert _sweep_exit({"status": {"interrupted": 1, "done": 2}, "signal": signal.SIGTERM}) == 143
    assert _sweep_exit({"status": {"interrupted": 1}, "signal": signal.SIGINT}) == 130
    assert _sweep_exit({"status": {"done": 3}}) == 0
