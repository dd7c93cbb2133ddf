"""The assistant stages from the command line: lineage, refusals, one-line errors, exact resume."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import forced_devices, straight_and_resumed

from plutao.experiments.cli import main
from plutao.train.run.lineage import load_run


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_stage_runs_record_their_lineage(tiny_stages):
    sft = json.loads((tiny_stages["sft"] / "config.json").read_text())
    rm = json.loads((tiny_stages["rm"] / "config.json").read_text())
    for record, parent in ((sft, tiny_stages["base"]), (rm, tiny_stages["sft"])):
        lineage = record["lineage"]
        assert lineage["parent"] == str(parent.absolute())
        assert lineage["step"] == 10 and len(lineage["config_hash"]) == 16
        assert lineage["tokenizer_fingerprint"] == record["provenance"]["tokenizer_fingerprint"]
        assert len(lineage["template_hash"]) == 16
    assert sft["train"]["task"] == "sft" and rm["train"]["task"] == "reward"
    assert rm["lineage"]["fresh"] == ["reward_head.b", "reward_head.w"]
    assert sft["model"] == {**rm["model"]}  # one model config down the chain


@pytest.mark.parametrize("stage, parent, extra, message", [
    ("sft", "base", ["data.tokenizer=byte"], "keeps its parent's model and tokenizer"),
    ("sft", "base", ["model.d_model=64"], "keeps its parent's model and tokenizer"),
    ("sft", "rm", [], "is a reward-model run"),
    ("reward", "base", [], "is not an SFT run"),
    ("reward", "sft", ["model.n_layers=3"], "keeps its parent's model and tokenizer"),
])
def test_a_parent_that_does_not_fit_is_refused(tiny_stages, tmp_path, capsys, stage, parent, extra, message):
    out_dir = tmp_path / "new"
    code, _, err = run_cli(capsys, stage, tiny_stages[parent], "--workdir", out_dir, *extra, "--quiet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("stage, lines, message", [
    ("sft", ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "{oops"],
     ":2: not valid JSON"),
    ("sft", ['{"messages": [{"role": "user", "content": "hi"}]}', '{"prompt": "a", "response": "b"}'],
     ":1: the conversation has no assistant turn"),
    ("reward", ['{"prompt": "2+2?", "responses": ["4"]}', '{"prompt": "1+1?", "chosen": "2", "rejected": "3"}'],
     ":1: a ranked list needs at least 2 responses"),
    ("reward", ['{"prompt": "2+2?", "chosen": "4"}'], ':1: a pair needs both "chosen" and "rejected"'),
])
def test_bad_user_data_is_a_one_line_error_and_writes_nothing(tiny_stages, tmp_path, capsys, stage, lines, message):
    data = write(tmp_path / "data.jsonl", lines)
    parent = tiny_stages["base" if stage == "sft" else "sft"]
    out_dir = tmp_path / "new"
    code, _, err = run_cli(capsys, stage, parent, "--workdir", out_dir, "--data", data, "--quiet")
    assert code == 2 and message in err and str(data) in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_best_of_needs_a_positive_n_and_a_reward_model(tiny_stages, capsys):
    code, _, err = run_cli(capsys, "sample", tiny_stages["sft"], "--prompt", "2+2?", "--best-of", "0",
                           "--reward", tiny_stages["rm"])
    assert code == 2 and "--best-of must be ≥ 1" in err
    code, _, err = run_cli(capsys, "sample", tiny_stages["sft"], "--prompt", "2+2?", "--best-of", "2")
    assert code == 2 and "needs --reward" in err
    code, _, err = run_cli(capsys, "sample", tiny_stages["sft"], "--prompt", "2+2?", "--best-of", "2",
                           "--reward", tiny_stages["sft"])
    assert code == 2 and "is not a reward-model run" in err


def test_best_of_n_picks_the_highest_reward(tiny_stages, capsys):
    code, out, _ = run_cli(capsys, "sample", tiny_stages["sft"], "--prompt", "2+2?", "--best-of", "4", "--reward",
                           tiny_stages["rm"], "--show-all", "--max-new-tokens", "8", "--temperature", "1")
    assert code == 0
    rows = [line for line in out.splitlines() if line.strip()]
    assert len(rows) == 4
    rewards = [float(r.split()[0]) for r in rows]
    assert rewards == sorted(rewards, reverse=True) and "*" in rows[0]
    code, best, _ = run_cli(capsys, "sample", tiny_stages["sft"], "--prompt", "2+2?", "--best-of", "4", "--reward",
                            tiny_stages["rm"], "--max-new-tokens", "8", "--temperature", "1")
    assert best.rstrip("\n") == eval(rows[0].split(None, 2)[-1])  # the starred reply, printed alone


def test_reward_eval_and_score(tiny_stages, capsys):
    code, out, _ = run_cli(capsys, "eval", tiny_stages["rm"], "--json")
    result = json.loads(out)
    assert code == 0 and 0.0 <= result["pairwise_accuracy"] <= 1.0 and result["pairs"] > 0
    for key in ("by_digits", "right_vs_wrong_accuracy", "both_wrong_accuracy", "gold_agreement", "brier",
                "calibration"):
        assert key in result
    # The training loop's last held-out figure is the same number.
    last_val = [json.loads(x) for x in (tiny_stages["rm"] / "metrics.jsonl").read_text().splitlines()
                if '"val"' in x][-1]
    np.testing.assert_allclose(result["pairwise_accuracy"], last_val["pairwise_accuracy"], atol=1e-6)
    code, out, _ = run_cli(capsys, "score", tiny_stages["rm"], "--prompt", "2+2?", "--response", "4", "--json")
    assert code == 0 and set(json.loads(out)) >= {"reward", "raw", "offset"}
    code, _, err = run_cli(capsys, "sample", tiny_stages["rm"], "--prompt", "hi")
    assert code == 2 and len(err.strip().splitlines()) == 1


SFT = [sys.executable, "-m", "plutao.experiments.cli", "sft"]


def test_sft_resumed_at_a_checkpoint_equals_uninterrupted(tiny_stages, tmp_path, capsys):
    """Fast sibling of the slow SIGKILL test below: the stage's resume path (its parent's weights restored
    once, then its own checkpoint; step-indexed chat batches) in one process, stopped by train.stop_at_step."""
    args = ["sft", str(tiny_stages["base"]), "train.steps=6", "train.checkpoint_every=3", "train.eval_every=0",
            "train.sample_every=0", "--quiet"]
    straight, resumed = straight_and_resumed(args, tmp_path, capsys, stop_at=3)
    for a, b in zip(jax.tree.leaves(jax.device_get(load_run(straight).params)),
                    jax.tree.leaves(jax.device_get(load_run(resumed).params))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow  # (fast sibling: test_sft_resumed_at_a_checkpoint_equals_uninterrupted)
def test_sft_resumes_exactly_after_sigkill(tiny_stages, tmp_path):
    args = ["train.steps=30", "train.checkpoint_every=10", "train.eval_every=0", "train.sample_every=0", "--quiet"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(SFT + [str(tiny_stages["base"]), "--workdir", str(straight)] + args, check=True, capture_output=True)
    proc = subprocess.Popen(SFT + [str(tiny_stages["base"]), "--workdir", str(killed)] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 30, f"finished before the signal: {steps}"
    subprocess.run(SFT + [str(tiny_stages["base"]), "--workdir", str(killed)] + args, check=True, capture_output=True)
    for a, b in zip(jax.tree.leaves(jax.device_get(load_run(straight).params)),
                    jax.tree.leaves(jax.device_get(load_run(killed).params))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow  # (fast siblings: test_multihost.py::test_two_processes_match_one_process, the same loop)
def test_sft_on_two_processes_and_a_2x2_mesh_equals_one_device(tiny_stages, tmp_path):
    """The stage runs sharded and multi-process exactly as pretraining does (gloo CPU collectives).
    Fast siblings: tests/test_multihost.py::test_two_processes_match_one_process and
    tests/test_train.py::test_multi_device_data_parallel_matches_one_device (the loop and sharded batches
    every stage uses)."""

    args = ["sft", str(tiny_stages["base"]), "train.steps=4", "train.eval_every=2", "train.sample_every=0",
            "train.batch_size=8", "--quiet"]
    def run(*argv, devices=1):
        env = forced_devices(devices)
        done = subprocess.run([sys.executable, "-m", "plutao.experiments", *argv], capture_output=True, text=True,
                              env=env, check=False)
        assert done.returncode == 0, done.stderr[-2000:]

    run(*args, "--workdir", str(tmp_path / "one"))
    run(*args, "--workdir", str(tmp_path / "mesh"), "mesh.data=2", "mesh.fsdp=2", devices=4)
    run("launch", "--local-processes", "2", "--devices-per-process", "1", "--", *args, "--workdir",
        str(tmp_path / "two"))

    def train_losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if r.get("split") in ("train", "val")]

    for other in ("mesh", "two"):
        np.testing.assert_allclose(train_losses(tmp_path / other), train_losses(tmp_path / "one"), rtol=2e-5)
