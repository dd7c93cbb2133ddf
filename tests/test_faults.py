"""Faults a shared cluster does to a run, injected for real: non-finite losses, corrupted checkpoint
files, a full disk, a second training in the same directory, SIGKILL; and changed configs on resume.

Every test runs `plutao` commands on real files (the kills and the concurrent training in processes
of their own, the rest through the CLI's entry point in this process, which is quicker) and asserts
the exit code, the one-line message, and that the earlier checkpoints still restore afterwards.
"""

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plutao.experiments.cli import main
from plutao.train.run.checkpoint import UNREADABLE_DIR, Checkpoints

TINY = ["train.log_every=5", "train.eval_every=10", "train.eval_batches=2", "train.checkpoint_every=10",
        "train.sample_every=0", "train.peak_flops=1e11"]


def plutao(*argv) -> subprocess.CompletedProcess:
    """A `plutao` command through the console script's entry point: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def train(run: Path, corpus: Path, *overrides, **kw) -> subprocess.CompletedProcess:
    return plutao("train", "tiny", f"data.path={corpus}", "--workdir", run, "--quiet", *TINY, *overrides, **kw)


def one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("plutao: error: ")]
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def eval_loss(run: Path) -> tuple[float, int]:
    result = plutao("eval", run, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    return out["loss"], out["step"]


def train_rows(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("split") == "train"]


@pytest.fixture(scope="module")
def stopped_run(small_corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "run"
    result = train(run, small_corpus, "train.steps=40", "train.stop_at_step=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Checkpoints(run / "checkpoints", read_only=True).all_steps() == [10, 20]
    return run


@pytest.fixture()
def run20(stopped_run, tmp_path) -> Path:
    """A run stopped (checkpointed, resumable) at step 20 of 40, with checkpoints 10 and 20 (a fresh copy)."""
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def test_a_nonfinite_loss_stops_the_run_without_saving_it(small_corpus, run20):
    good_loss, _ = eval_loss(run20)
    result = train(run20, small_corpus, "train.steps=40", "optim.lr=1e4", "--allow-changed", "optim.lr")
    one_line_error(result, 3, "NaN/inf at step 2", "without saving", "checkpoints/20")
    # Nothing of the diverged state was written: checkpoint 20 is still the newest, and it evaluates as before.
    assert Checkpoints(run20 / "checkpoints", read_only=True).all_steps() == [10, 20]
    assert eval_loss(run20) == (pytest.approx(good_loss, rel=1e-6), 20)
    assert max(train_rows(run20)) == 20


def test_skip_leaves_parameters_unchanged_and_counts_the_skipped_steps(small_corpus, tmp_path):
    run = tmp_path / "run"
    result = train(run, small_corpus, "train.steps=20", "optim.lr=1e4", "optim.grad_clip=0", "optim.warmup_steps=0",
                   "train.on_nonfinite=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_steps"] for r in rows if r.get("split") == "train"]
    assert skipped == sorted(skipped) and skipped[-1] > 0, skipped
    loss, step = eval_loss(run)
    assert step == 20 and math.isfinite(loss)  # the saved parameters are the last good ones


def corrupt(checkpoint: Path) -> None:
    """Truncate every data file of a checkpoint to half its size."""
    files = [p for p in checkpoint.rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files
    for p in files:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])


def test_resume_skips_an_unreadable_checkpoint_and_keeps_it(small_corpus, run20):
    corrupt(run20 / "checkpoints" / "20")
    result = train(run20, small_corpus, "train.steps=40")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "cannot be read" in line]
    assert len(notes) == 1 and "checkpoint 20 cannot be read" in notes[0] and "resuming from checkpoint 10" in notes[0]
    assert "Traceback" not in result.stderr
    kept = run20 / UNREADABLE_DIR / "20"
    assert kept.is_dir() and any(kept.rglob("*.ocdbt"))  # moved aside, never deleted
    assert eval_loss(run20)[1] == 40
    # Resumed from 10: every step's row once (the rows past 10 of the first attempt were dropped).
    assert train_rows(run20) == list(range(5, 45, 5))


def test_no_readable_checkpoint_is_one_line_and_exit_2(small_corpus, run20):
    for step in (10, 20):
        corrupt(run20 / "checkpoints" / str(step))
    before = sorted(str(p) for p in run20.rglob("*"))
    result = train(run20, small_corpus, "train.steps=40")
    one_line_error(result, 2, "no checkpoint", "10:", "20:")
    assert sorted(str(p) for p in run20.rglob("*")) == before  # nothing moved, deleted or written


def can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)]
    return subprocess.run(mount, capture_output=True, check=False).returncode == 0


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_earlier_checkpoints(small_corpus, tmp_path):
    disk = tmp_path / "disk"
    if shutil.which("mount") is None or not can_mount_tmpfs(disk):
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        run = disk / "run"
        first = train(run, small_corpus, "train.steps=40", "train.stop_at_step=10")
        assert first.returncode == 0, first.stderr[-3000:]
        # Fill the disk up to ~150 KB: room for metrics and events, not for a ~400 KB checkpoint.
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 150_000))
        result = train(run, small_corpus, "train.steps=40")
        line = one_line_error(result, 1, "saving checkpoint 20", "No space left on device", "needs about",
                              "checkpoint 10")
        assert "free there" in line
        (disk / "filler").unlink()
        assert Checkpoints(run / "checkpoints", read_only=True).all_steps() == [10]
        assert not list((run / "checkpoints").glob("*tmp*"))  # the partial step is gone, space returned
        again = train(run, small_corpus, "train.steps=40")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from" in again.stderr and eval_loss(run)[1] == 40
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def start(run: Path, corpus: Path, *overrides) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "plutao.experiments", "train", "tiny", f"data.path={corpus}",
                             "--workdir", str(run), "--quiet", *TINY, *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_training(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process holds the lock and has logged a training step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = run / "train.lock"
        if lock.is_file() and lock.read_text().strip() and (run / "metrics.jsonl").is_file() and train_rows(run):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("the training never started")


def test_a_second_training_in_the_same_directory_is_refused(small_corpus, tmp_path):
    run = tmp_path / "run"
    first = start(run, small_corpus, "train.steps=200", "train.eval_every=0")
    try:
        wait_for_training(run, first)
        second = train(run, small_corpus, "train.steps=200", "train.eval_every=0")
        one_line_error(second, 2, "is in use", f"pid {first.pid}", f"host {os.uname().nodename}", "started ")
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    steps = train_rows(run)
    assert steps == sorted(set(steps)) and steps[-1] == 200  # one training wrote every row, once
    assert (run / "train.lock").read_text() == ""  # released


def test_a_lock_whose_holder_was_killed_is_taken_over(small_corpus, tmp_path):
    run = tmp_path / "run"
    victim = start(run, small_corpus, "train.steps=400", "train.eval_every=0", "train.checkpoint_every=20")
    wait_for_training(run, victim)
    while not (run / "checkpoints" / "20").is_dir():
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert json.loads((run / "train.lock").read_text())["pid"] == victim.pid  # left behind
    result = train(run, small_corpus, "train.steps=60", "train.eval_every=0", "train.checkpoint_every=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over the lock of pid {victim.pid}" in result.stderr
    assert "resumed from" in result.stderr and eval_loss(run)[1] == 60


def test_read_only_commands_do_not_need_the_lock(small_corpus, run20):
    (run20 / "train.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    import fcntl

    with open(run20 / "train.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running training holds it
        assert eval_loss(run20)[1] == 20
        assert plutao("sample", run20, "--max-new-tokens", "5").returncode == 0
        refused = train(run20, small_corpus, "train.steps=40")
        one_line_error(refused, 2, "is in use", "pid 1 on host elsewhere")


def test_training_time_lives_inside_the_checkpoint(small_corpus, run20):
    meta = Checkpoints(run20 / "checkpoints", read_only=True).metadata(20)
    assert meta["train_seconds"] > 0 and meta["nonfinite_steps"] == 0
    assert not (run20 / "train_seconds.json").exists()


def test_a_changed_experiment_is_refused_unless_allowed(small_corpus, run20):
    before = (run20 / "config.json").read_text()
    refused = train(run20, small_corpus, "train.steps=40", "optim.lr=1e-3", "train.batch_size=4", "train.seed=1")
    line = one_line_error(refused, 2, "optim.lr 0.003 → 0.001", "train.batch_size 8 → 4", "train.seed 0 → 1",
                          "--allow-changed optim.lr train.batch_size train.seed", "--workdir")
    assert "train.steps" not in line
    assert (run20 / "config.json").read_text() == before
    # Raising train.steps (and other run-control keys) is not a different experiment.
    allowed = train(run20, small_corpus, "train.steps=50", "optim.lr=1e-3", "--allow-changed", "optim.lr",
                    "train.stop_at_step=30")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    config = json.loads((run20 / "config.json").read_text())
    assert config["optim"]["lr"] == 1e-3 and config["train"]["steps"] == 50
    (entry,) = config["history"]
    assert entry["step"] == 20 and entry["changes"] == {"optim.lr": [0.003, 0.001]}
    # Resuming again with the recorded settings needs no flag.
    assert train(run20, small_corpus, "train.steps=50", "optim.lr=1e-3").returncode == 0
