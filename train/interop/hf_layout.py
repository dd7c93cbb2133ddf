"""What the Hugging Face layouts (train/interop/hf_gpt2.py, hf_llama.py) share: refusing settings
plutao does not implement, and the helpers their parameter plans are written with.

An import plan maps each of our parameter paths to (the checkpoint tensors it reads, build(get) →
our array); an export plan lists (tensor name, make(get) → the tensor from our parameters) in file
order. Both build one tensor at a time, so neither direction holds a model twice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from plutao.train.config.errors import UserError

Build = Callable[[Callable[[str], np.ndarray]], np.ndarray]


def refuse(config: dict, where: str, keys: dict[str, str]) -> None:
    """A one-line error for each setting that is on (true, a window, more than one expert)."""
    for key, what in keys.items():
        value = config.get(key)
        if value is None or value is False or value == [] or value == {}:
            continue
        if type(value) is int and value <= 1 and key != "sliding_window":  # (0 or 1 experts: a dense MLP)
            continue
        raise UserError(f"{where}: {key}={value!r} ({what}) is not supported")


def same(name: str) -> tuple[list[str], Build]:
    """Import: the tensor as it is."""
    return [name], lambda get: get(name)


def transposed(name: str) -> tuple[list[str], Build]:
    """Import: a Linear weight stored (out, in), as our (in, out)."""
    return [name], lambda get: get(name).T


class Exports(list):
    """An export plan being written: [(tensor name, make(get))]."""

    def add(self, name: str, make) -> None:
        self.append((name, make))

    def same(self, name: str, path: tuple, size: int = 0) -> None:
        """Our parameter as it is; with `size`, a bias this model may not have, written as zeros."""
        self.append((name, lambda get: get(path) if size == 0 or has(get, path) else np.zeros(size, np.float32)))


def has(get, path) -> bool:
    try:
        get(path)
    except KeyError:
        return False
    return True
