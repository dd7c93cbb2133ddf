"""`plutao pipeline arith`: every stage per seed, resumable; a stage cut short is not marked done."""

import json

import pytest

from plutao.experiments.cli import main

TINY = ["--scale", "0.01", "--problems", "2", "--best-of", "2", "base:model.n_layers=1", "base:model.d_model=32",
        "base:model.n_heads=2", "world.documents=400", "world.demonstrations=400", "rl.prompts=8",
        "rl.minibatches=2", "rl.eval_problems=2", "train.sample_every=0"]


@pytest.mark.slow  # (about 3 minutes: every stage twice over, tiny)
def test_the_pipeline_resumes_a_stage_cut_short_and_skips_finished_ones(tmp_path, capsys):
    work = tmp_path / "pipe"
    assert main(["pipeline", "arith", "--workdir", str(work), *TINY, "sft:train.stop_at_step=2"]) == 2
    err = capsys.readouterr().err
    assert "stage sft stopped before its last step" in err and len(err.strip().splitlines()[-1:]) == 1
    seed = work / "seed0"
    assert (seed / "base.done").is_file() and not (seed / "sft.done").exists()
    base_done = (seed / "base.done").read_text()
    assert main(["pipeline", "arith", "--workdir", str(work), *TINY]) == 0
    err = capsys.readouterr().err
    assert "seed 0 base: done before, skipped" in err
    assert (seed / "base.done").read_text() == base_done
    for stage in ("sft", "rm", "ppo", "dpo", "grpo-gold", "grpo-rm"):
        assert (seed / f"{stage}.done").is_file(), stage
    report = json.loads((seed / "report-card" / "report.json").read_text())
    assert set(report["runs"]) == {"base", "sft", "sft+best-of-2", "ppo", "dpo", "grpo-gold", "grpo-rm"}
    assert report["runs"]["sft"]["kl_to_reference"] == 0.0 or abs(report["runs"]["sft"]["kl_to_reference"]) < 1e-6
    for row in ("step_by_step_accuracy_by_digits", "direct_accuracy_by_digits", "problems_file_accuracy"):
        assert row in report["runs"]["sft"], row
    assert len((seed / "unseen-phrasings.jsonl").read_text().splitlines()) == 100  # the card's problems file
    assert "ppo vs sft" in report["correctness_win_rates"] and len(report["leaderboard"]) == 7
    assert json.loads((seed / "base" / "config.json").read_text())["world"]["seed"] == 0  # --seeds varies the world
    # --tools calculator (the default): the SFT run learned to call it, the later stages may, the card asks both ways.
    assert json.loads((seed / "sft" / "config.json").read_text())["world"]["tool_rate"] > 0
    assert json.loads((seed / "grpo-gold" / "config.json").read_text())["rl"]["tools"] == "calculator"
    assert "tool_accuracy_by_digits" in report["runs"]["grpo-rm"] and "tool_accuracy_by_digits" not in report["runs"]["base"]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["seeds"] == [0] and "ppo vs sft" in summary["win_rates"]
    assert summary["reports"]["0"]["runs"] == report["runs"] and "3" in summary["correctness_win_rates"]
    assert "Pipeline summary" in (work / "summary.md").read_text() and "accuracy (with the tool)" in (
        work / "summary.md").read_text()


def test_an_unknown_tool_stops_the_pipeline_before_any_stage(tmp_path, capsys):
    assert main(["pipeline", "arith", "--workdir", str(tmp_path / "p"), "--tools", "abacus"]) == 2
    assert "--tools abacus: unknown tool 'abacus'" in capsys.readouterr().err and not (tmp_path / "p").exists()
