import os
from pathlib import Path

import pytest

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
    """A tiny base → SFT → reward-model chain on the arithmetic world (seconds per stage)."""
    from plutao.experiments.cli import main

    root = tmp_path_factory.mktemp("stages")
    base, sft, rm = root / "base", root / "sft", root / "rm"
    assert main(["train", "tiny", "--workdir", str(base), "data.path=builtin:arith-dialogue", "train.steps=10",
                 "world.documents=2000", "--quiet"]) == 0
    assert main(["sft", str(base), "--workdir", str(sft), "train.steps=10", "train.eval_every=5",
                 "train.sample_every=0", "train.checkpoint_every=5", "world.demonstrations=2000", "--quiet"]) == 0
    assert main(["reward", str(sft), "--workdir", str(rm), "train.steps=4", "train.eval_every=2",
                 "world.comparisons=20", "--quiet"]) == 0
    return {"base": base, "sft": sft, "rm": rm}
