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
    from plutao.train.corpora import python_docstrings

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(python_docstrings()[:400]))
    return path
