"""What a run directory records about itself: its config.json, and the lineage of a run started from
another run's checkpoint (`train.init_from=RUN[:STEP]`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from plutao.train.config.errors import UserError

SECTIONS = ("data", "model", "train", "optim", "mesh")


def read_run_config(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; restore it or choose another --workdir") from None


def existing_run_config(run_dir: Path) -> dict:
    """The saved config of a run that read-only commands open, or one line on what RUN_DIR is instead."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if saved is not None:
        return saved
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist; pass the --workdir of a `plutao train` run")
    raise UserError(f"{run_dir} is not a run directory (no config.json); pass the --workdir of a `plutao train` run")


def config_hash(saved: dict) -> str:
    """A short hash of a run's experiment (its five config sections, not its provenance)."""
    text = json.dumps({k: saved.get(k) for k in SECTIONS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_init_from(spec: str) -> tuple[Path, int | None]:
    """`RUN` or `RUN:STEP` → (run directory, step or None = its newest readable checkpoint)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return Path(head).expanduser(), int(tail)
    return Path(spec).expanduser(), None
