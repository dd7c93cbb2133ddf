"""Named batches: a batch is a dict of arrays (`tokens`, `targets`, `loss_weights`, `segment_ids`,
`positions`, or whatever a task needs), each key with its logical axes, sharded by the one table in
train/parallel/sharding.py.

A task turns the rows its data source draws (a pure function of (seed, step), see train/data/sources.py and
train/data/pairs.py) into named arrays. `sharded_batch` builds the global batch from the rows this
process's devices hold only: the row source is asked once per distinct row range, and each key is
cut from the same rows, so every key of a batch agrees on which examples it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from plutao.train.parallel import sharding

Batch = dict[str, Any]
# The logical axes of the keys every task may use; a task declares the ones it produces (and may add its own).
AXES: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "length"),  # model inputs
    "targets": ("batch", "length"),  # what each position predicts
    "loss_weights": ("batch", "length"),  # how much each target counts (0 = not at all)
    "segment_ids": ("batch", "length"),  # which packed document a position belongs to (0 = padding)
    "positions": ("batch", "length"),  # position ids (restarting per packed document)
    "source": ("batch", "length"),  # translation: the source sentence (padded)
}


def shardings(axes: dict[str, tuple[str, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """Each key's sharding from its logical axes."""
    return {k: NamedSharding(mesh, sharding.logical_to_spec(a, mesh)) for k, a in axes.items()}


@dataclasses.dataclass
class NamedBatches:
    """A row source (data.Batches or pairs.PairBatches) seen through a task's `named(rows)`: the same
    step-indexed draws, as dicts of named arrays."""

    source: Any
    named: Callable[[np.ndarray], Batch]
    axes: dict[str, tuple[str, ...]]
    # Key shapes per row shape: worked out once (a source has a handful of row shapes), not per step.
    _shapes: dict = dataclasses.field(default_factory=dict, repr=False)

    def __getattr__(self, name):  # epochs_consumed, tokens_per_step, val_batches, splits, ...
        if name in ("source", "_shapes"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def shapes(self, row_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        row_shape = tuple(row_shape)
        if row_shape not in self._shapes:
            self._shapes[row_shape] = {k: v.shape for k, v in self.named(np.zeros(row_shape, np.int32)).items()}
        return self._shapes[row_shape]

    def train(self, step: int, rows: slice = slice(None)) -> Batch:
        return self.named(self.source.train_rows(step, rows))

    def val(self, index: int, rows: slice = slice(None)) -> Batch:
        return self.named(self.source.val_rows(index, rows))

    def train_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        return self.shapes(self.source.train_shape(step))

    def val_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        return self.shapes(self.source.val_shape(index))

    def sharded_train(self, step: int, mesh: Mesh) -> Batch:
        return sharded_batch(lambda rows: self.train(step, rows), self.train_shapes(step), self.axes, mesh)

    def sharded_block(self, steps: range, length: int, mesh: Mesh) -> Batch:
        """The batches of consecutive `steps` (of one shape) stacked on a leading axis of `length`
        slots, the unused ones zero: what one dispatch of several train steps reads."""
        draws = [lambda rows, step=step: self.train(step, rows) for step in steps]
        return sharded_stack(draws, length, self.train_shapes(steps[0]), self.axes, mesh)

    def sharded_val(self, index: int, mesh: Mesh) -> Batch:
        return sharded_batch(lambda rows: self.val(index, rows), self.val_shapes(index), self.axes, mesh)


def sharded_batch(draw: Callable[[slice], Batch], shapes: dict[str, tuple[int, ...]],
                  axes: dict[str, tuple[str, ...]], mesh: Mesh) -> Batch:
    """The global batch, built from the rows each local device holds: `draw(rows)` is called once per
    distinct row range this process needs, never for rows only other processes hold."""
    drawn: dict[tuple, Batch] = {}
    n_rows = next(iter(shapes.values()))[0]

    def part(key):
        def rows_for(index):
            rows = index[0]
            span = rows.indices(n_rows)
            if span not in drawn:
                drawn[span] = draw(rows)
            return drawn[span][key][(slice(None), *index[1:])]
        return rows_for

    sh = shardings({k: axes[k] for k in shapes}, mesh)
    return {k: jax.make_array_from_callback(shape, sh[k], part(k)) for k, shape in shapes.items()}


def stacked_shardings(axes: dict[str, tuple[str, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """Each key's sharding with a leading (unsplit) axis of steps."""
    return {k: NamedSharding(mesh, PartitionSpec(None, *sh.spec)) for k, sh in shardings(axes, mesh).items()}


def sharded_stack(draws: list[Callable[[slice], Batch]], length: int, shapes: dict[str, tuple[int, ...]],
                  axes: dict[str, tuple[str, ...]], mesh: Mesh) -> Batch:
    """Several batches of one shape as one global batch with a leading axis of `length` slots (the
    batches first, then zeros), each process drawing only the rows its devices hold."""
    drawn: dict[tuple, Batch] = {}
    n_rows = next(iter(shapes.values()))[0]

    def part(key):
        def rows_for(index):
            span = index[1].indices(n_rows)
            if span not in drawn:
                batches = [draw(index[1]) for draw in draws]
                drawn[span] = {k: np.stack([b[k] for b in batches] + [np.zeros_like(batches[0][k])] * (length - len(draws)))
                               for k in batches[0]}
            return drawn[span][key][(index[0], slice(None), *index[2:])]
        return rows_for

    sh = stacked_shardings({k: axes[k] for k in shapes}, mesh)
    return {k: jax.make_array_from_callback((length, *shape), sh[k], part(k)) for k, shape in shapes.items()}


def global_batch(batch: Batch, axes: dict[str, tuple[str, ...]], mesh: Mesh) -> Batch:
    """Place a whole batch held by this (single) process with each key's sharding."""
    sh = shardings({k: axes[k] for k in batch}, mesh)
    return {k: jax.device_put(v, sh[k]) for k, v in batch.items()}
