"""Sweeps on a real SLURM cluster through submitit: job arrays, and a trial spanning 2 processes.

`.ci/slurm-up.sh` starts a single-node cluster (slurmctld + slurmd on localhost); without one these
tests are skipped.
"""

import json
import shutil
import subprocess

import pytest

from plutao.experiments.sweep import sweep
from plutao.experiments.sweep_spec import SweepSpec

FAST = {"train.eval_every": 10, "train.checkpoint_every": 20, "train.log_every": 5, "train.peak_flops": 1e11,
        "train.steps": 20}


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(state.strip() in ("idle", "mix", "alloc") for state in out.stdout.splitlines())


pytestmark = pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster (run .ci/slurm-up.sh)")


def test_a_sweep_runs_as_a_slurm_job_array(tmp_path, small_corpus):
    spec = SweepSpec(base="tiny", grid={"model.norm": ["pre", "post"]}, executor="slurm", parallel=2,
                     slurm={"timeout_min": 10, "cpus_per_task": 1}, overrides={**FAST, "data.path": str(small_corpus)})
    logs = []
    sweep(spec, tmp_path / "s", {}, log=logs.append)
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "s").glob("trials/*/trial.json")}
    assert {k: r["status"] for k, r in records.items()} == {"norm=pre": "done", "norm=post": "done"}
    assert any("submitted job array" in line for line in logs)
    scripts = list((tmp_path / "s" / "slurm").rglob("*submission.sh"))
    assert scripts and "#SBATCH --array=0-1%2" in scripts[0].read_text()
    # Re-running finds both trials finished and submits nothing.
    logs.clear()
    sweep(spec, tmp_path / "s", {}, log=logs.append)
    assert not any("submitted" in line for line in logs)


def test_a_multi_process_trial_joins_jax_distributed_under_slurm(tmp_path, small_corpus):
    spec = SweepSpec(base="tiny", trials=[{"mesh.data": 2}], executor="slurm",
                     slurm={"timeout_min": 10, "tasks_per_node": 2, "cpus_per_task": 1},
                     overrides={**FAST, "data.path": str(small_corpus)})
    sweep(spec, tmp_path / "mh", {}, log=lambda m: None)
    (trial,) = (tmp_path / "mh").glob("trials/*")
    record = json.loads((trial / "trial.json").read_text())
    assert record["status"] == "done", record.get("error")
    provenance = json.loads((trial / "config.json").read_text())["provenance"]
    assert "2 process(es)" in provenance["devices"] and provenance["mesh"]["data"] == 2
