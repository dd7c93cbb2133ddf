"""Corpora that need no path: built from this Python installation, or downloaded once into a cache.

`builtin:python-docs` is the docstrings of the interpreter's standard library: real English prose
written by people, present wherever Python is, identical for every user of the same Python version.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from plutao.train.config.errors import UserError

DOWNLOADS = {
    "tinyshakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                        None),
    "wikitext2": ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
                  "wikitext-2-raw/wiki.train.raw"),
}
BUILTINS = ("builtin:python-docs",)
DOC_SEPARATOR = "\x00"  # never occurs in source files


def python_docstrings() -> list[str]:
    """Every module, class and function docstring of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
    return docs


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def builtin_documents(name: str, cache_dir: Path) -> list[str]:
    """A built-in corpus's documents; extracted once per Python version, then read from the cache."""
    if name == "builtin:python-docs":
        version = sysconfig.get_python_version()
        cached = cache_dir / "corpora" / f"python-docs-{version}-{_short_hash(sysconfig.get_paths()['stdlib'])}.txt"
        if cached.is_file():
            return cached.read_text(encoding="utf-8").split(DOC_SEPARATOR)
        docs = python_docstrings()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".part")
        tmp.write_text(DOC_SEPARATOR.join(docs), encoding="utf-8")
        tmp.replace(cached)
        return docs
    raise UserError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTINS + tuple(DOWNLOADS))}")


def download(name: str, cache_dir: Path, timeout: float = 20.0) -> Path:
    """The local path of a named corpus, downloading it into the cache the first time."""
    url, member = DOWNLOADS[name]
    target = cache_dir / "corpora" / f"{name}.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            partial.write_bytes(response.read())
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"cannot download {name} from {url} ({getattr(e, 'reason', e)}); when offline, fetch the file "
            f"elsewhere and pass data.path=FILE, or place it at {target}"
        ) from None
    if member is not None:
        with zipfile.ZipFile(partial) as z:
            partial.write_bytes(z.read(member))
    partial.replace(target)
    return target
