import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# How every test process compiles (this one, xdist workers, and each subprocess a test starts, which
# inherit the environment): XLA's CPU backend with its expensive passes off (the programs under test
# are tiny; numerics are unchanged: tests/test_goldens.py checks them against recorded values), and a
# persistent compilation cache shared by the whole session, so each program shape compiles once.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def forced_devices(n: int) -> dict[str, str]:
    """Environment for a subprocess that sees n CPU devices (keeping the session's XLA flags)."""
    return os.environ | {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}


def exact_xla_env() -> dict[str, str]:
    """Environment for a subprocess that compiles as a user's run does (XLA's default optimizations), for
    numbers compared with goldens recorded that way; the session's compilation cache is kept."""
    env = dict(os.environ)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    return env


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller set the environment up
        return
    root = Path(tempfile.mkdtemp(prefix="plutao-test-session-"))
    config._plutao_session_dir = root
    os.environ.update({
        "PLUTAO_TEST_SESSION": str(root),
        "JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip(),
    })


def pytest_unconfigure(config):
    root = getattr(config, "_plutao_session_dir", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """At most 4 workers: each test may itself start processes (trainings, multi-host groups)."""
    return max(1, min(os.cpu_count() or 1, 4))


def built_once(name: str, build, tmp_path_factory) -> Path:
    """A directory built by the first test process of the session that asks for it (xdist workers
    included); the others wait for it and reuse it. Tests that write into it copy it first."""
    session = os.environ.get("PLUTAO_TEST_SESSION")
    root = Path(session) / "built" if session else tmp_path_factory.mktemp("built")
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(target, ignore_errors=True)
            build(target)
            (root / f"{name}.done").touch()
    return target


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINYSHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tokenized-corpus cache in a temporary folder, shared by the whole session."""
    path = tmp_path_factory.mktemp("plutao-cache")
    old = os.environ.get("PLUTAO_CACHE")
    os.environ["PLUTAO_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PLUTAO_CACHE", None)
    else:
        os.environ["PLUTAO_CACHE"] = old


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not TINYSHAKESPEARE.is_file():
        pytest.skip(f"{TINYSHAKESPEARE} not present")
    return TINYSHAKESPEARE


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A few KB of real English text that needs no shared data: the stdlib's docstrings."""
    from plutao.train.data.corpora import python_docstrings

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(python_docstrings()[:400]))
    return path


@pytest.fixture(scope="session")
def tiny_stages(tmp_path_factory):
    """A tiny base → SFT → reward-model chain on the arithmetic world (seconds per stage), built once per
    session (shared by the xdist workers)."""
    from plutao.experiments.cli import main

    def build(root: Path):
        base, sft, rm = root / "base", root / "sft", root / "rm"
        assert main(["train", "tiny", "--workdir", str(base), "data.path=builtin:arith-dialogue", "train.steps=10",
                     "world.documents=2000", "--quiet"]) == 0
        assert main(["sft", str(base), "--workdir", str(sft), "train.steps=10", "train.eval_every=5",
                     "train.sample_every=0", "train.checkpoint_every=5", "world.demonstrations=2000", "--quiet"]) == 0
        assert main(["reward", str(sft), "--workdir", str(rm), "train.steps=4", "train.eval_every=2",
                     "world.comparisons=20", "--quiet"]) == 0

    root = built_once("stages", build, tmp_path_factory)
    return {"base": root / "base", "sft": root / "sft", "rm": root / "rm"}


def straight_and_resumed(args: list[str], tmp_path: Path, capsys, stop_at: int) -> tuple[Path, Path]:
    """A run of the command `args` straight through, and the same run stopped at `stop_at`
    (train.stop_at_step, a checkpoint there) and resumed in this process; checks that it did resume."""
    from plutao.experiments.cli import main

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args + ["--workdir", str(straight)]) == 0
    assert main(args + ["--workdir", str(resumed), f"train.stop_at_step={stop_at}"]) == 0
    capsys.readouterr()
    assert main(args + ["--workdir", str(resumed)]) == 0
    assert f"resumed from {resumed}/checkpoints/{stop_at}" in capsys.readouterr().err  # (not a fresh start)
    return straight, resumed
