"""Orbax checkpoints of the training state: async saves, the latest k kept plus the best by val loss.

What a run can rely on:
- A checkpoint carries its own resume metadata (val loss, training seconds, non-finite step count)
  in orbax's per-step metadata, written inside the step directory before orbax finalizes it: a
  checkpoint and its metadata appear together or not at all.
- Old checkpoints are deleted only after a newer one is finalized on disk, by this class rather
  than by orbax's garbage collection (which also runs after a failed save): a failed save never
  costs an earlier checkpoint.
- A failed save (disk full, permissions, I/O) raises `SaveError` with one line saying what failed,
  where, and how much space a checkpoint needs; the partial step directory is removed.
- Restoring checks the checkpoint's recorded tree against the target first: a checkpoint of another
  model/optimizer is a `UserError`; one whose files cannot be read is `Unreadable`, and
  `restore_newest` falls back to the next older one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from plutao.train.config.errors import SaveError, UserError

UNREADABLE_DIR = "checkpoints-unreadable"  # beside checkpoints/: where resume moves checkpoints it cannot read


class Unreadable(Exception):
    """A checkpoint's files cannot be read (truncated, corrupted, missing); the message is the reason."""


def _quiet_closed_loop_callbacks() -> None:
    """After a failed read, tensorstore's I/O threads still post results to the asyncio loop orbax has
    closed, and Python reports each `RuntimeError: Event loop is closed` as an unraisable exception
    (dozens of tracebacks for one unreadable checkpoint). Drop exactly those; report the rest as usual."""
    previous = sys.unraisablehook
    if getattr(previous, "_plutao_quiet", False):
        return

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    hook._plutao_quiet = True
    sys.unraisablehook = hook


def _short_reason(exc: BaseException) -> str:
    """One readable clause from an orbax/tensorstore/OS error."""
    text = str(exc) or type(exc).__name__
    code = re.search(r"os_error_code='?(\d+)", text)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if code:
        return os.strerror(int(code.group(1)))
    first = re.sub(r"\s*\[(tensorstore_spec|source locations)=.*", "", text.strip().splitlines()[0])
    status = re.match(r"([A-Z_]+): (.*)", first)  # tensorstore: "DATA_LOSS: Error reading ...: <cause>"
    if status:
        first = f"{status.group(1)}: {status.group(2).split(': ')[-1]}"
    return first[:200]


def _leaf_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    return {_leaf_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 2, async_save: bool = True, read_only: bool = False,
                 compress: bool = True):
        self.directory = Path(directory).absolute()
        self.keep = max(keep, 1)
        # Orbax logs every failure it raises (with tracebacks) and warns about read-only managers;
        # what matters reaches the user as one line from here.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        _quiet_closed_loop_callbacks()
        # No preservation policy: orbax keeps everything, and `_prune` deletes only after a save finalized.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, read_only=read_only,
                                                 create=not read_only),
            # (uncompressed: zstd's buffers hold about a second copy of the state while saving; an
            # imported model, saved once and read often, is written without them)
            item_handlers=ocp.StandardCheckpointHandler() if compress else ocp.PyTreeCheckpointHandler(use_compression=False),
        )
        self.compress = compress
        self._pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def steps_saved_or_saving(self) -> list[int]:
        """Every finalized step, and the one being written in the background."""
        return sorted(set(self.all_steps() + ([self._pending[0]] if self._pending else [])))

    def metadata(self, step: int) -> dict:
        """The step's resume metadata ({} when it has none or it cannot be read)."""
        try:
            meta = self.manager.metadata(step)
        except Exception:  # noqa: BLE001 (an unreadable checkpoint has no metadata)
            return {}
        out = dict(meta.metrics or {})  # (older checkpoints kept val_loss as an orbax metric)
        out.update(meta.custom_metadata or {})
        return out

    # --- saving ----------------------------------------------------------------------------------

    def save(self, step: int, state, meta: dict | None = None) -> None:
        """Start writing `state` as checkpoint `step`, with `meta` (JSON values) inside it.

        Waits for the previous save first (and raises `SaveError` if that one failed)."""
        self._finish()
        if step in self.manager.all_steps():
            return
        nbytes = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
        try:
            args = ocp.args.StandardSave(state) if self.compress else ocp.args.PyTreeSave(state)
            self.manager.save(step, args=args, custom_metadata=meta or {}, force=True)
        except Exception as e:  # noqa: BLE001 (whatever the storage raised, it ends in one line)
            raise self._save_error(step, e, nbytes) from None
        self._pending = (step, nbytes)

    def _finish(self) -> None:
        """Wait for the save in flight; on success prune old checkpoints, on failure raise SaveError."""
        if self._pending is None:
            return
        step, nbytes = self._pending
        self._pending = None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(step, e, nbytes) from None
        self.manager.reload()
        if step not in self.manager.all_steps():
            raise self._save_error(step, RuntimeError("the checkpoint was not finalized"), nbytes)
        self._prune()

    def _prune(self) -> None:
        """Keep the latest `keep` checkpoints and the best by val loss; delete the others."""
        steps = self.all_steps()
        kept = set(steps[-self.keep:])
        scored = [(meta["val_loss"], s) for s in steps
                  if isinstance((meta := self.metadata(s)).get("val_loss"), (int, float)) and math.isfinite(meta["val_loss"])]
        if scored:
            kept.add(min(scored)[1])
        for s in steps:
            if s not in kept:
                self.manager.delete(s)

    def _save_error(self, step: int, exc: BaseException, nbytes: int) -> SaveError:
        reason = _short_reason(exc)
        for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)  # a half-written step, never a checkpoint
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = None
        full = "No space left" in reason or "Disk quota" in reason
        room = (f"; a checkpoint needs about {_human(nbytes)}" + (f" and {_human(free)} are free there" if free is not None
                                                                  else ""))
        earlier = [s for s in self.all_steps() if s != step]
        kept = f"; checkpoint {earlier[-1]} and the earlier ones are intact" if earlier else ""
        fix = "free some space" if full else "fix the cause"
        return SaveError(f"saving checkpoint {step} in {self.directory} failed: {reason}{room if full else ''}{kept}; "
                         f"{fix} and run the same command again to resume")

    # --- restoring -------------------------------------------------------------------------------

    def recorded_leaves(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{"params.blocks.0.mlp.w_in": (shape, dtype), ...}: what checkpoint `step` holds, from its metadata."""
        try:
            recorded = self.manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001
            raise Unreadable(_short_reason(e)) from None
        if recorded is None or getattr(recorded, "tree", None) is None:
            raise Unreadable("its metadata cannot be read")
        return _leaves(recorded.tree)

    def restore_part(self, step: int, target):
        """Restore only the leaves of `target` (a sub-tree of the checkpoint's, e.g. {"params": ...}, or
        some of the parameters): nothing else is read, the optimizer state included. A leaf the
        checkpoint lacks or holds with another shape is a UserError."""
        saved, wanted = self.recorded_leaves(step), _leaves(target)
        for name, spec in wanted.items():
            if saved.get(name) != spec:
                has = f"has {name} {saved[name][0]} {saved[name][1]}" if name in saved else f"has no {name}"
                raise UserError(f"checkpoint {step} in {self.directory} does not fit: it {has}, but this model needs "
                                f"{spec[0]} {spec[1]}")
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        try:
            return ocp.PyTreeCheckpointer().restore(self.directory / str(step) / "default", args=args)
        except Exception as e:  # noqa: BLE001 (tensorstore raises ValueError/RuntimeError/OSError for bad files)
            raise Unreadable(_short_reason(e)) from None

    def restore(self, step: int, target):
        """Restore into `target` (ShapeDtypeStructs with shardings). A checkpoint of another shape is a
        UserError; one whose files cannot be read raises Unreadable."""
        saved, wanted = self.recorded_leaves(step), _leaves(target)
        if saved != wanted:
            diff = sorted(set(saved.items()) ^ set(wanted.items()))
            name, (shape, dtype) = diff[0]
            where = "the checkpoint has" if (name, (shape, dtype)) in saved.items() else "this config needs"
            raise UserError(f"checkpoint {step} does not fit this model/optimizer ({where} {name} {shape} {dtype}); "
                            "use the config it was trained with or a new --workdir")
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 (tensorstore raises ValueError/RuntimeError/OSError for bad files)
            raise Unreadable(_short_reason(e)) from None

    def restore_newest(self, target, agree=lambda failed: failed, *, part: bool = False
                       ) -> tuple[int, dict, list[tuple[int, str]]]:
        """The newest checkpoint that restores: (step, state, [(step, reason) of newer unreadable ones]).

        `agree(failed)` makes several processes take the same decision (any failure counts for all).
        None restoring is a UserError that lists each checkpoint's reason; nothing is moved or deleted."""
        unreadable: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state, reason = (self.restore_part if part else self.restore)(step, target), None
            except Unreadable as e:
                state, reason = None, str(e)
            if agree(reason is not None):
                unreadable.append((step, reason or "unreadable on another process"))
                continue
            return step, state, unreadable
        listed = "; ".join(f"{s}: {r}" for s, r in unreadable)
        raise UserError(f"no checkpoint in {self.directory} can be read ({listed}); they are left as they are: "
                        "restore their files, or use a new --workdir")

    def set_aside(self, step: int) -> Path:
        """Move an unreadable checkpoint out of the way (never delete it): RUN_DIR/checkpoints-unreadable/STEP."""
        target = self.directory.parent / UNREADABLE_DIR / str(step)
        n = 1
        while target.exists():
            target = target.with_name(f"{step}.{n}")
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def close(self) -> None:
        """Finish the save in flight (raising SaveError if it failed) and release orbax's threads."""
        try:
            self._finish()
        finally:
            with contextlib.suppress(Exception):  # (a failed save was reported above)
                self.manager.close()
