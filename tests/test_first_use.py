"""What a new user hits first: exit codes of runs stopped by a signal, Ctrl-C at any moment, a --workdir
holding another kind of run, a mistyped command, the stage defaults in --help, the pipeline's summary
with one seed, and a report card that resumes from its finished columns."""

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plutao.experiments import cli
from plutao.experiments.cli import main

ARITH = ["data.path=builtin:arith-dialogue", "world.documents=2000"]


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("plutao: error: "), err
    return err


# --- 1. a run stopped by a signal exits 130 / 143 -----------------------------------------------------

def stopped_by(sig):
    """A stand-in for train/loop.py's train: the loop's StopFlag receives `sig`, and the loop returns
    the summary of a run stopped early, saying which signal stopped it (sig None: train.stop_at_step)."""
    def train(cfg, run_dir, **kwargs):
        from plutao.train.run.resume import StopFlag

        with StopFlag() as stop:
            if sig is not None:
                signal.raise_signal(sig)
        return {"interrupted": True, "step": 3, "run_dir": str(run_dir), "signal": stop.signal}
    return train


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (None, 0)])
def test_train_exits_with_the_signal_that_stopped_it(monkeypatch, capsys, tmp_path, sig, code):
    monkeypatch.setattr("plutao.train.loop.train", stopped_by(sig))
    assert main(["train", "tiny", "--workdir", str(tmp_path / "run"), *ARITH, "--json"]) == code
    summary = json.loads(capsys.readouterr().out)
    assert summary["interrupted"] and summary.get("signal") == sig


def test_every_stage_exits_with_the_signal_that_stopped_it(monkeypatch, capsys, tmp_path, tiny_stages):
    base, sft, rm = (str(tiny_stages[k]) for k in ("base", "sft", "rm"))
    monkeypatch.setattr("plutao.experiments.commands.assistant.make_comparisons", lambda *a, **k: None)
    monkeypatch.setattr("plutao.experiments.commands.rl.write_pairs", lambda *a, **k: None)
    rl = ["rl.max_new_tokens=8"]  # (the tiny model's context is 32 tokens)
    commands = {"sft": ["sft", base], "reward": ["reward", sft], "ppo": ["ppo", sft, "--reward", rm, *rl],
                "grpo": ["grpo", sft, "--reward", "gold", *rl], "dpo": ["dpo", sft, "--data", rm]}
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        monkeypatch.setattr("plutao.train.loop.train", stopped_by(sig))
        for name, argv in commands.items():
            got = main([*argv, "--workdir", str(tmp_path / f"{name}-{sig}"), "--json"])
            out, err = capsys.readouterr()
            assert got == code, (name, err)
            assert json.loads(out)["signal"] == sig, name
    monkeypatch.setattr("plutao.train.loop.train", stopped_by(None))  # train.stop_at_step: no signal
    assert main(["ppo", sft, "--reward", rm, *rl, "--workdir", str(tmp_path / "ppo-stop")]) == 0


def last_step(run: Path) -> int:
    steps = [0]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:  # (a line being written)
            pass
    return max(steps)


def test_a_real_run_stopped_by_sigterm_exits_143_and_stop_at_step_exits_0(tiny_stages, tmp_path):
    """The loop itself: SIGTERM mid-run saves, says how to resume and exits 143; stop_at_step exits 0."""
    run = tmp_path / "base"
    shutil.copytree(tiny_stages["base"], run)
    argv = [sys.executable, "-m", "plutao.experiments", "train", "tiny", "--workdir", str(run), *ARITH,
            "train.steps=100000", "train.eval_every=100000", "train.sample_every=0", "--quiet", "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and last_step(run) <= 10:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "Run the same command again to resume" in err.strip().splitlines()[-1]
    assert json.loads(out)["signal"] == signal.SIGTERM
    assert max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) > 10
    step = json.loads(out)["step"]
    assert main(["train", "tiny", "--workdir", str(run), *ARITH, "train.steps=100000", "train.eval_every=100000",
                 "train.sample_every=0", f"train.stop_at_step={step + 2}", "--quiet"]) == 0


# --- 2. Ctrl-C at any moment: one line, exit 130 (SIGTERM: 143) ---------------------------------------

def _handlers_installed(pid: int) -> bool:
    """Whether the process catches SIGTERM (the entry point's handlers are in place)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    caught = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), None)
    return caught is None or bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("delay", [0.3, 3.0])
def test_an_interrupt_at_any_moment_is_one_line(tmp_path, delay):
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        argv = [sys.executable, "-m", "plutao.experiments", "train", "tiny", "--workdir", str(tmp_path / sig.name),
                *ARITH, "train.steps=100000", "train.eval_every=100000", "train.sample_every=0", "--quiet"]
        procs[sig] = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.time())
    for sig, (proc, started) in procs.items():
        while not _handlers_installed(proc.pid) and time.time() < started + 10:  # (Python's own start-up)
            time.sleep(0.005)
        time.sleep(max(0.0, started + delay - time.time()))
        proc.send_signal(sig)
    for sig, (proc, _) in procs.items():
        _, err = proc.communicate(timeout=60)
        lines = err.strip().splitlines()
        assert proc.returncode == 128 + sig, err[-3000:]
        assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
        assert len(lines) <= 3, err  # ("plutao: interrupted", or the loop's start line and how to resume)
        assert lines[-1].startswith("plutao: interrupted") or "Run the same command again" in lines[-1], err


# --- 3. a --workdir that holds another kind of run ---------------------------------------------------

def test_a_workdir_of_another_kind_is_refused_with_the_command_that_resumes_it(capsys, tmp_path, tiny_stages):
    sft, base = tmp_path / "sft", tmp_path / "base"
    shutil.copytree(tiny_stages["sft"], sft)
    shutil.copytree(tiny_stages["base"], base)
    before = tree_digest(sft), tree_digest(base)
    err = one_line_error(capsys, ["train", "tiny", "--workdir", str(sft), *ARITH])
    assert f"{sft} is a `plutao sft` run (its config.json: train.task=sft)" in err
    assert f"plutao sft {tiny_stages['base']} --workdir {sft}" in err and "--allow-changed" not in err
    err = one_line_error(capsys, ["reward", str(tiny_stages["sft"]), "--workdir", str(sft)])
    assert "is a `plutao sft` run" in err and "this `plutao reward` run a new --workdir" in err
    err = one_line_error(capsys, ["ppo", str(tiny_stages["sft"]), "--reward", str(tiny_stages["rm"]), "--workdir",
                                  str(base)])
    assert "is a `plutao train` run" in err and f"plutao train {base / 'config.json'} --workdir {base}" in err
    assert (tree_digest(sft), tree_digest(base)) == before
    # The command it names resumes the run (here: already finished, so it only reports).
    err = one_line_error(capsys, ["dpo", str(tiny_stages["sft"]), "--workdir", str(sft)])
    command = err.split("resume it with `")[1].split("`")[0]
    assert main([*shlex.split(command)[1:], "--quiet"]) == 0
    assert "already trained to step 10" in capsys.readouterr().err


# --- 4. a mistyped command ----------------------------------------------------------------------------

def test_an_unknown_command_or_choice_says_did_you_mean(capsys):
    for argv, expected in ((["trian"], "plutao: error: unknown command 'trian'; did you mean train?"),
                           (["pipeline", "arth", "--workdir", "x"],
                            "plutao: error: argument world: invalid choice 'arth'; did you mean arith?")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip() == expected


# --- 5. --help: train without the RL keys, each stage with its own defaults ----------------------------

def _help(capsys, command) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_train_help_leaves_out_rl_keys_and_stage_help_shows_the_stage_defaults(capsys):
    out = _help(capsys, "train")
    assert "optim.lr = " in out and "rl.beta =" not in out and "rl.prompts =" not in out
    expected = {"sft": ("optim.lr = 0.0005", "train.steps = 600", "model.dropout = 0.0"),
                "reward": ("train.steps = 300", "optim.lr = 0.0002"),
                "ppo": ("rl.beta = 0.1", "rl.prompts = 64", "optim.lr = 3e-05", "rl.value_lr = 0.0001"),
                "grpo": ("rl.group = 8", "rl.beta = 0.04", "train.steps = 40", "optim.lr = 3e-05"),
                "dpo": ("rl.beta = 0.1", "optim.min_lr = 2e-06")}
    for stage, lines in expected.items():
        out = _help(capsys, stage)
        for line in lines:
            assert f"  {line}\n" in out, (stage, line)
        assert "model.n_layers =" not in out and "train.task =" not in out  # (the parent's; the command's)
        if stage in ("sft", "reward"):
            assert "rl." not in out.split("config keys")[1], stage
        if stage == "dpo":
            assert "rl.prompts =" not in out


# --- 6. the pipeline: one seed, a stage stopped by a signal; the report card ---------------------------

def test_the_pipeline_summary_with_one_seed_has_no_spread():
    from plutao.experiments.pipeline import markdown, summarize

    report = {"runs": {"base": {"accuracy": 0.25, "step": 4, "accuracy_by_digits": {"1": 0.5}},
                       "sft": {"accuracy": 0.75, "step": 4, "accuracy_by_digits": {"1": 1.0}}},
              "win_rates": {"sft vs base": {"rate": 0.8, "low": 0.6, "high": 0.9},
                            "base vs sft": {"rate": 0.2, "low": 0.1, "high": 0.4}}}
    md = markdown(summarize({0: report}))
    assert "±" not in md and "1 seed" in md and "| 0.750 |" in md and "| sft vs base | 0.800 |" in md
    two = markdown(summarize({0: report, 1: report}))
    assert "0.750 ± 0.000" in two and "seeds 0, 1" in two


def test_the_pipeline_stops_with_the_signal_that_stopped_a_stage(monkeypatch, capsys, tmp_path):
    """A stage that exits 130/143 (its checkpoint kept) stops the pipeline with that code; not done."""
    calls = []

    def stage(argv):
        calls.append(argv[0])
        run_dir = Path(argv[argv.index("--workdir") + 1])
        (run_dir / "checkpoints" / "1").mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps({"train": {"steps": 1 if argv[0] == "train" else 5}}))
        return 0 if argv[0] == "train" else 143

    monkeypatch.setattr(cli, "main", stage)
    assert cli.run(["pipeline", "arith", "--workdir", str(tmp_path / "pipe")]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("plutao: interrupted by SIGTERM: pipeline: seed 0 stage sft was stopped"), err
    assert calls == ["train", "sft"]
    seed = tmp_path / "pipe" / "seed0"
    assert (seed / "base.done").is_file() and not (seed / "sft.done").exists()


def test_report_card_defaults_to_runs_and_resumes_its_finished_columns(tiny_stages, tmp_path, capsys):
    args = cli.build_parser().parse_args(["report-card", "x"])
    assert args.out == os.path.join("runs", "report-card")
    runs = [str(tiny_stages["base"]), str(tiny_stages["sft"])]
    whole = tmp_path / "whole"
    assert main(["report-card", *runs, "--problems", "1", "--out", str(whole), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert not (whole / "columns").exists()  # (the card holds them now)
    # SIGTERM once the first column is kept: one line, exit 143, the column stays for the re-run.
    out = tmp_path / "card"
    proc = subprocess.Popen([sys.executable, "-m", "plutao.experiments", "report-card", *runs, "--problems", "1",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "columns" / "base.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "plutao: interrupted by SIGTERM" and "Traceback" not in err
    assert (out / "columns" / "base.json").is_file() and not (out / "report.json").exists()
    assert main(["report-card", *runs, "--problems", "1", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert "base: measured before, reused" in captured.err and "base: 5 greedy" not in captured.err
    assert "sft: 5 greedy" in captured.err
    resumed = json.loads(captured.out)
    assert {k: v for k, v in resumed.items() if k != "files"} == {k: v for k, v in expected.items() if k != "files"}
    assert not (out / "columns").exists()


# --- sweeps: a trial that exits 130/143 with its summary is interrupted (or pruned), not failed ---------

@pytest.mark.parametrize("code,pruned,status", [(143, False, "interrupted"), (143, True, "pruned"),
                                                (130, False, "interrupted"), (1, False, "failed")])
def test_a_sweep_trial_stopped_by_a_signal_is_not_failed(monkeypatch, tmp_path, code, pruned, status):
    from plutao.experiments import sweep
    from plutao.experiments.sweep_spec import SweepSpec

    script = f"import sys; print('{{\"interrupted\": true, \"step\": 3}}'); sys.exit({code})"
    monkeypatch.setattr(sweep, "train_command", lambda base, trial: [sys.executable, "-c", script])
    trial = sweep.Trial("t", {}, 0, {}, tmp_path / "t")  # (variant, params, seed, overrides, directory)
    (tmp_path / "t").mkdir()
    record = sweep.Runner(SweepSpec(base="tiny"), tmp_path, print).run(trial, (lambda t, p: pruned))
    assert record["status"] == status
