"""Every command keeps its compiled programs in the persistent XLA cache (experiments/xla_cache.py):
the same command again compiles nothing new, and a changed XLA flag is never served a program
compiled under the old one."""

import os
import subprocess
import sys

from plutao.experiments import xla_cache


def entries(root):
    return {p.name for p in (root / "xla").iterdir()} if (root / "xla").is_dir() else set()


def score(run_dir, env):
    """`plutao score` in a process of its own (one compiled program: the quickest command that compiles)."""
    out = subprocess.run([sys.executable, "-m", "plutao.experiments.cli", "score", str(run_dir), "--text", "12+30",
                          "--json"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-1500:]
    return out.stdout


def test_a_second_command_compiles_nothing_and_another_flag_recompiles(tiny_stages, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env["PLUTAO_CACHE"] = str(tmp_path)
    first = score(tiny_stages["base"], env)
    cached = entries(tmp_path)
    assert cached, "the first run wrote no compiled program"
    assert score(tiny_stages["base"], env) == first and entries(tmp_path) == cached  # (all served from disk)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = (flags.replace("--xla_llvm_disable_expensive_passes=true", "") if "expensive" in flags
                        else f"{flags} --xla_llvm_disable_expensive_passes=true")
    score(tiny_stages["base"], env)
    assert entries(tmp_path) - cached, "a changed XLA flag was served the programs compiled without it"


def test_the_cache_is_switched_on_before_jax_unless_told_otherwise(monkeypatch, tmp_path):
    keys = set(xla_cache.compilation_cache_env())
    environ = {k: v for k, v in os.environ.items() if k not in keys} | {"PLUTAO_CACHE": str(tmp_path),
                                                                        "PLUTAO_XLA_CACHE": "off"}
    monkeypatch.setattr(os, "environ", environ)  # (this process's own environment is left alone)
    xla_cache.enable()
    assert "JAX_COMPILATION_CACHE_DIR" not in environ
    del environ["PLUTAO_XLA_CACHE"]
    xla_cache.enable()
    assert environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "xla") and keys <= set(environ)
    environ["JAX_COMPILATION_CACHE_DIR"] = "/elsewhere"  # (a directory chosen already is kept)
    xla_cache.enable()
    assert environ["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
