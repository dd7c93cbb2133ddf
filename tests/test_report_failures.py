"""A sweep in which no trial finished: the report says so, lists the errors and draws no empty plots."""

import json
import warnings
from pathlib import Path

from plutao.experiments.cli import main

FAST = ["train.eval_every=10", "train.checkpoint_every=10", "train.log_every=5", "train.peak_flops=1e11"]
ERROR = "unknown config key 'model.n_headz'; did you mean model.n_heads?"


def test_a_sweep_whose_every_trial_failed_reports_that_and_draws_nothing(capsys, tmp_path, small_corpus):
    sweep_dir = tmp_path / "all-failed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["sweep", "tiny", "--workdir", str(sweep_dir), "--grid", "model.n_headz=1,2",
                     f"data.path={small_corpus}", "train.steps=5", *FAST])
    assert code == 1  # the sweep ran; its trials failed
    assert not [w for w in caught if "No artists with labels" in str(w.message)]
    assert "No artists with labels" not in capsys.readouterr().err
    out = sweep_dir / "report"
    assert not list(out.glob("*.png"))  # nothing to draw, so no (empty) picture
    text = (out / "report.md").read_text()
    assert "Only one variant finished" not in text
    assert "No trial finished" in text
    for name in ("n_headz=1", "n_headz=2"):
        assert f"- `{name}`: failed — {ERROR}" in text
    assert "## Plots" not in text and ".png" not in text
    assert "– s |" not in text  # no wall time is a dash, not "– s"

    (out / "loss_curves.png").write_bytes(b"")  # e.g. the empty picture an earlier version drew
    assert main(["report", str(sweep_dir), "--json"]) == 0
    assert not (out / "loss_curves.png").exists()
    result = json.loads(capsys.readouterr().out)
    assert result["plots"] == [] and result["significance"].startswith("No trial finished")
    assert all(Path(p).is_file() for p in (result["report"], result["csv"]))
    assert main(["report", str(sweep_dir)]) == 0
    written = capsys.readouterr().out.strip().splitlines()[-1]
    assert written.startswith("written: ") and ".png" not in written
