"""`plutao merge-lora RUN --workdir OUT`: a LoRA run's base with its adapters added in, as an ordinary
run directory (config.json with lora.rank=0, the tokenizer, one checkpoint of the merged weights).

The merged weights are W + (α/r)·A·B, the very sum the LoRA run's forward pass computed
(model/lora.py), so the merged run's logits equal the adapted model's. OUT is written aside and
renamed into place: it never overwrites an existing directory and a failure leaves nothing behind (a
merge stopped by Ctrl-C leaves its staging folder, which the next merge into OUT removes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from plutao.train.config.errors import UserError


def cmd_merge_lora(args) -> int:
    import dataclasses

    from flax import nnx

    from plutao.train.config.schema import LoRAConfig
    from plutao.train.run.checkpoint import Checkpoints
    from plutao.train.run.lineage import load_run
    from plutao.train.run.rundir import config_hash, existing_run_config

    src, out = Path(args.run_dir), Path(args.workdir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--workdir {out} exists and is not empty; give a new directory for the merged run")
    run = load_run(src, args.step)
    if not run.cfg.lora.rank:
        raise UserError(f"{src} is not a LoRA run (lora.rank=0): its checkpoint already holds whole weights")
    saved = existing_run_config(src)
    merged = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
    cfg = dataclasses.replace(run.cfg, lora=LoRAConfig())
    record = cfg.to_dict() | {k: saved[k] for k in ("provenance",) if k in saved}
    record["lineage"] = dict(saved.get("lineage", {})) | {
        "merged_from": {"run": str(src.absolute()), "step": run.step, "config_hash": config_hash(saved),
                        "lora": dataclasses.asdict(run.cfg.lora)}}
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for left in out.parent.glob(f".{out.name}.tmp-*"):  # (of a merge stopped at once by Ctrl-C: its process is gone)
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        shutil.copytree(src / "tokenizer", staging / "tokenizer")
        (staging / "config.json").write_text(json.dumps(record, indent=2))
        checkpoints = Checkpoints(staging / "checkpoints", async_save=False)
        checkpoints.save(run.step, {"params": merged}, {"merged_from": str(src.absolute())})
        checkpoints.close()
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"merged {src} (step {run.step}, LoRA rank {run.cfg.lora.rank} on {', '.join(run.cfg.lora.targets)}) "
          f"into {out}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (someone else's)
        return True
    return True


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    ml = sub.add_parser("merge-lora", help="a LoRA run's base plus its adapters as an ordinary run (whole weights)")
    ml.add_argument("run_dir", help="a run trained with lora.rank > 0")
    ml.add_argument("--workdir", required=True, help="the merged run's directory (new)")
    ml.add_argument("--step", type=int, help="the LoRA run's checkpoint (default: its latest)")
    ml.set_defaults(fn=cmd_merge_lora)
