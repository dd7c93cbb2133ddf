"""The persistent XLA compilation cache every plutao command uses: a program compiled once (by a
training, a sweep's trial, a `plutao sample`) is loaded from disk the next time instead of compiled.

It is JAX's own cache, switched on through the environment before JAX is imported (the same
mechanism the test session uses). JAX keys each entry by the program and by everything that changes
what it compiles to: the jax and jaxlib versions, the backend and its devices, the compile options
and the XLA_FLAGS in force; so an entry compiled for another version, device or flag set is never
served (tests/test_xla_cache.py changes a flag and sees a recompile). One fixed directory,
PLUTAO_CACHE/xla (default ~/.cache/plutao/xla); it is not capped (JAX's size cap keeps an access-time
file per entry and warns on every entry written without one, as sweeps wrote them): delete the
folder to reclaim the space. PLUTAO_XLA_CACHE=off turns it off; a JAX_COMPILATION_CACHE_DIR already
set is kept.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PLUTAO_CACHE", Path.home() / ".cache" / "plutao")).expanduser()


def compilation_cache_env() -> dict[str, str]:
    """The environment that turns the cache on: every program cached, however quick to compile (a
    one-shot command's compiles are each well under JAX's default threshold of one second)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_root() / "xla"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def enable() -> None:
    """Set the cache's environment for this process (before JAX is imported), unless it is switched
    off or a cache directory was chosen already."""
    if os.environ.get("PLUTAO_XLA_CACHE", "").lower() in ("0", "off", "false", "no"):
        return
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    os.environ.update(compilation_cache_env())
