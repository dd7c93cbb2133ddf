"""Orbax checkpoints of the training state: async saves, the latest k kept plus the best by val loss."""

from __future__ import annotations

import logging
from pathlib import Path

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from plutao.train.errors import UserError


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 2, async_save: bool = True, read_only: bool = False):
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=max(keep, 1)),
            # BestN keeps the tail of the sorted list; descending order puts the lowest loss last.
            pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ])
        if read_only:  # orbax warns that a read-only manager is read-only; nothing to tell the user
            logging.getLogger("absl").setLevel(logging.ERROR)
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                                 read_only=read_only, create=not read_only),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, val_loss: float | None = None) -> None:
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

    def restore(self, step: int, target):
        """Restore into `target` (ShapeDtypeStructs with shardings); a shape mismatch is a user error."""
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint {step} does not fit this model/optimizer ({str(e).splitlines()[0][:160]}); "
                            "use the config it was trained with or a new --workdir") from None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
