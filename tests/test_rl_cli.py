"""PPO, GRPO, DPO and LoRA from the command line: one-line refusals that write nothing, exact resume
after SIGKILL, the same losses on 2 processes × 2 devices as on 1 × 4, DPO's start at log 2, LoRA's
exactness (zero B = the base, merged = base + adapters) and that only adapters are trained."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import forced_devices, straight_and_resumed

from plutao.experiments.cli import main
from plutao.model.heads import forward_logits
from plutao.train.run.checkpoint import Checkpoints
from plutao.train.run.lineage import load_run

RL = ["rl.prompts=8", "rl.minibatches=2", "rl.max_new_tokens=8", "rl.eval_problems=2", "train.sample_every=0",
      "--quiet"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _records(run_dir, split="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("split") == split]


def _tampered_reward_run(tiny_stages, tmp_path):
    """A copy of the reward run whose recorded tokenizer is another one."""
    other = tmp_path / "rm-other-tokenizer"
    shutil.copytree(tiny_stages["rm"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["provenance"]["tokenizer_fingerprint"] = "0" * 16
    (other / "config.json").write_text(json.dumps(cfg))
    return other


@pytest.mark.parametrize("case", ["ppo-no-reward", "ppo-reward-is-sft", "ppo-other-tokenizer", "grpo-group-1",
                                  "lora-target", "lora-on-reward", "dpo-beta", "grpo-unknown-tool", "grpo-tools-untrained"])
def test_bad_rl_input_is_a_one_line_error_and_writes_nothing(tiny_stages, tmp_path, capsys, case):
    sft, work = tiny_stages["sft"], tmp_path / "run"
    argv, message = {
        "ppo-no-reward": (["ppo", sft, "--workdir", work, *RL], "give --reward RM_RUN"),
        "ppo-reward-is-sft": (["ppo", sft, "--reward", sft, "--workdir", work, *RL], "not a reward model"),
        "ppo-other-tokenizer": (["ppo", sft, "--reward", _tampered_reward_run(tiny_stages, tmp_path), "--workdir", work,
                                 *RL], "another tokenizer"),
        "grpo-group-1": (["grpo", sft, "--reward", "gold", "--group", "1", "--workdir", work, *RL], "G ≥ 2"),
        "lora-target": (["sft", tiny_stages["base"], "--workdir", work, "lora.rank=4", "lora.targets=[attention,qkv]",
                         "--quiet"], "unknown target 'qkv'"),
        "lora-on-reward": (["reward", sft, "--workdir", work, "lora.rank=4", "--quiet"], "lora.rank applies to"),
        "dpo-beta": (["dpo", sft, "--workdir", work, "--beta", "0", "--quiet"], "--beta must be > 0"),
        "grpo-unknown-tool": (["grpo", sft, "--reward", "gold", "--workdir", work, "rl.tools=abacus", *RL],
                              "unknown tool 'abacus'"),
        "grpo-tools-untrained": (["grpo", sft, "--reward", "gold", "--workdir", work, "rl.tools=calculator", *RL],
                                 "the policy's tokenizer has no tool tokens"),
    }[case]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not work.exists()


def test_rl_runs_record_both_parents_and_serve_the_policy(tiny_stages, tmp_path, capsys):
    work = tmp_path / "ppo"
    assert main(["ppo", str(tiny_stages["sft"]), "--reward", str(tiny_stages["rm"]), "--workdir", str(work),
                 "train.steps=2", "train.eval_every=2", *RL]) == 0
    lineage = json.loads((work / "config.json").read_text())["lineage"]
    assert lineage["parent"] == str(tiny_stages["sft"].absolute())
    assert lineage["reward"]["parent"] == str(tiny_stages["rm"].absolute()) and "offset" in lineage["reward"]
    train = _records(work)
    assert [r["step"] for r in train] == [1, 2]
    for key in ("rm_score", "gold_reward", "kl", "kl_k3", "entropy", "clipfrac", "approx_kl", "value_loss",
                "explained_variance", "mean_length", "ratio_mean", "ratio_var", "logprob_gap", "sample_seconds"):
        assert key in train[0], key
    assert all(r["kl"] >= 0 and r["kl_k3"] >= 0 for r in train)
    assert all(r["logprob_gap"] < 1e-4 for r in train)  # (rollout and training log-probs agree)
    assert "accuracy_by_digits" in _records(work, "val")[-1]
    # Sampling, chat and the report card use the policy alone.
    code, _, err = run_cli(capsys, "sample", work, "--prompt", "What is 2 plus 3?", "--max-new-tokens", "4")
    assert code == 0, err
    run = load_run(work)
    assert set(run.params) == set(load_run(tiny_stages["sft"]).params)


PLUTAO = [sys.executable, "-m", "plutao.experiments"]


def test_ppo_resumed_at_a_checkpoint_equals_uninterrupted(tiny_stages, tmp_path, capsys):
    """Fast sibling of the slow SIGKILL test below: the RL loop's resume path (checkpoint, optimizer and
    value-head state, step-indexed rollout seeds, the adaptive β, PPO-ptx's step-indexed pretraining rows
    and the policy's moving average) in one process, stopped by train.stop_at_step."""
    args = ["ppo", str(tiny_stages["sft"]), "--reward", str(tiny_stages["rm"]), "train.steps=4",
            "train.checkpoint_every=2", "train.eval_every=0", "rl.ptx_coef=0.5", "rl.ema=0.5", *RL]
    straight, resumed = straight_and_resumed(args, tmp_path, capsys, stop_at=2)
    keys = ("loss", "pg_loss", "value_loss", "ptx_loss", "rm_score", "kl", "clipfrac")
    want = {r["step"]: [r[k] for k in keys] for r in _records(straight)}
    got = {r["step"]: [r[k] for k in keys] for r in _records(resumed)}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step, values in want.items():
        np.testing.assert_allclose(got[step], values, rtol=1e-5, atol=1e-7)
    # rl.ptx_data left empty: the base run's own data, recorded in the run's config.
    base_data = json.loads((tiny_stages["base"] / "config.json").read_text())["data"]
    rl = json.loads((straight / "config.json").read_text())["rl"]
    assert (rl["ptx_data"], rl["ptx_weights"]) == (base_data["path"], base_data["weights"])
    # The run serves the moving average (not the policy), and the resumed run's is the straight one's.
    run = load_run(straight)
    target = {part: {slot: run.trainer.abstract_sharded_state()["params"]} for part, slot in
              (("params", "policy"), ("frozen", "ema"))}
    saved = Checkpoints(straight / "checkpoints", async_save=False, read_only=True).restore_part(4, target)
    served, ema, policy = (jax.tree.leaves(t) for t in (run.params, saved["frozen"]["ema"], saved["params"]["policy"]))
    assert all(np.array_equal(a, b) for a, b in zip(served, ema))
    assert any(not np.array_equal(a, b) for a, b in zip(ema, policy))
    for a, b in zip(served, jax.tree.leaves(load_run(resumed).params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # (fast sibling: test_ppo_resumed_at_a_checkpoint_equals_uninterrupted)
def test_ppo_resumes_exactly_after_sigkill(tiny_stages, tmp_path):
    args = ["ppo", str(tiny_stages["sft"]), "--reward", str(tiny_stages["rm"]), "train.steps=6",
            "train.checkpoint_every=2", "train.eval_every=0", *RL]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(PLUTAO + args + ["--workdir", str(straight)], check=True, capture_output=True)
    proc = subprocess.Popen(PLUTAO + args + ["--workdir", str(killed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 6, f"finished before the signal: {steps}"
    subprocess.run(PLUTAO + args + ["--workdir", str(killed)], check=True, capture_output=True)
    keys = ("loss", "pg_loss", "value_loss", "rm_score", "kl", "clipfrac")
    want = {r["step"]: [r[k] for k in keys] for r in _records(straight)}
    got = {r["step"]: [r[k] for k in keys] for r in _records(killed)}  # (steps after the checkpoint: logged twice)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step, values in want.items():
        np.testing.assert_allclose(got[step], values, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # (about 3 minutes: two PPO runs in subprocesses, one of them two processes)
def test_ppo_on_two_processes_of_two_devices_equals_one_process_of_four(tiny_stages, tmp_path):
    args = ["ppo", str(tiny_stages["sft"]), "--reward", str(tiny_stages["rm"]), "train.steps=2", "train.eval_every=0",
            "mesh.data=2", "mesh.fsdp=2", *RL]

    def run(*argv, devices):
        env = forced_devices(devices)
        done = subprocess.run(PLUTAO + list(argv), capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 0, done.stderr[-2000:]

    run(*args, "--workdir", str(tmp_path / "one"), devices=4)
    run("launch", "--local-processes", "2", "--devices-per-process", "2", "--", *args, "--workdir",
        str(tmp_path / "two"), devices=2)
    keys = ("loss", "pg_loss", "value_loss", "rm_score", "kl")
    one = [[r[k] for k in keys] for r in _records(tmp_path / "one")]
    two = [[r[k] for k in keys] for r in _records(tmp_path / "two")]
    np.testing.assert_allclose(two, one, rtol=2e-5, atol=1e-7)


def test_dpo_starts_at_log_2_and_moves_the_margin(tiny_stages, tmp_path):
    work = tmp_path / "dpo"
    assert main(["dpo", str(tiny_stages["sft"]), "--data", str(tiny_stages["rm"]), "--workdir", str(work),
                 "train.steps=4", "train.log_every=1", "train.eval_every=2", "train.batch_size=4",
                 "train.sample_every=0", "optim.lr=1e-3", "optim.warmup_steps=0", "--quiet"]) == 0
    train = _records(work)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # (step 1's loss: policy = reference)
    assert train[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    for key in ("chosen_reward", "rejected_reward", "accuracy", "chosen_logprob"):
        assert key in train[-1]
    assert train[-1]["margin"] > 0
    pairs = [json.loads(x) for x in (work / "pairs" / "train.jsonl").read_text().splitlines()]
    assert pairs and all(len(p["meta"]["reference_logprobs"]) == 2 for p in pairs)


def test_lora_starts_as_its_base_trains_only_adapters_and_merges_exactly(tiny_stages, tmp_path):
    base = tiny_stages["base"]
    zero, lora, merged = tmp_path / "zero", tmp_path / "lora", tmp_path / "merged"
    common = ["train.eval_every=0", "train.sample_every=0", "world.demonstrations=2000", "lora.rank=4",
              "lora.targets=[attention,mlp]", "--quiet"]
    # optim.lr tiny and one step: B stays ~0, so the adapted model equals the base (B = 0 at the start).
    assert main(["sft", str(base), "--workdir", str(zero), "train.steps=1", "optim.warmup_steps=1000", *common]) == 0
    tokens = np.array([[1, 5, 9, 12, 7, 3, 4, 8]], np.int32)
    base_logits = np.asarray(forward_logits(load_run(base).model, tokens)[0])
    zero_logits = np.asarray(forward_logits(load_run(zero).model, tokens)[0])
    np.testing.assert_allclose(zero_logits, base_logits, atol=1e-5)
    assert main(["sft", str(base), "--workdir", str(lora), "train.steps=6", "optim.lr=1e-2", "optim.warmup_steps=0",
                 *common]) == 0
    saved = Checkpoints(lora / "checkpoints", async_save=False, read_only=True)
    leaves = saved.recorded_leaves(6)
    saved.close()
    params = [k for k in leaves if k.startswith("params.")]
    assert params and all(k.startswith("params.lora.") for k in params)  # (the base is referenced, not copied)
    assert not any(k.startswith("frozen.") for k in leaves)
    adapted = np.asarray(forward_logits(load_run(lora).model, tokens)[0])
    assert np.abs(adapted - base_logits).max() > 1e-3  # (the adapters learned something)
    code = main(["merge-lora", str(lora), "--workdir", str(merged)])
    assert code == 0
    merged_run = load_run(merged)
    assert merged_run.cfg.lora.rank == 0
    np.testing.assert_allclose(np.asarray(forward_logits(merged_run.model, tokens)[0]), adapted, atol=1e-5)
    # Only the adapted projections moved: every other weight of the merged model is the base's, bit for bit.
    flat_base = jax.tree_util.tree_flatten_with_path(jax.device_get(load_run(base).params))[0]
    flat_merged = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(merged_run.params))[0])
    adapted_names = {"w_qkv", "w_o", "w_in", "w_out", "w_gate"}
    for path, value in flat_base:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in adapted_names:
            assert np.abs(flat_merged[path] - value).max() > 0, path
        else:
            np.testing.assert_array_equal(flat_merged[path], value)


def test_dpo_refuses_pairs_made_from_other_rankings_once_trained(tiny_stages, tmp_path, capsys):
    work = tmp_path / "dpo"
    args = ["train.steps=1", "train.eval_every=0", "train.batch_size=4", "train.sample_every=0", "--quiet"]
    assert main(["dpo", str(tiny_stages["sft"]), "--data", str(tiny_stages["rm"]), "--workdir", str(work), *args]) == 0
    capsys.readouterr()
    before = (work / "pairs" / "train.jsonl").read_text()
    other = tmp_path / "rankings.jsonl"
    other.write_text("".join(json.dumps({"prompt": "What is 1 plus 1?", "responses": ["2", "3"]}) + "\n"
                             for _ in range(4)))
    code, _, err = run_cli(capsys, "dpo", tiny_stages["sft"], "--data", other, "--workdir", work, *args)
    assert code == 2 and "holds the pairs" in err and len(err.strip().splitlines()) == 1, err
    assert (work / "pairs" / "train.jsonl").read_text() == before  # (the pairs it was trained on are kept)
