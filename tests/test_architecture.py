"""The layering the code promises (README: "Where things live"): model/ is plain model math, the
experiments layer sits on top of everything, and only the task registry asks which family a run is."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "train", "tokenizer", "experiments")
# Where `family` may still be read outside train/tasks/, and why (README lists the same places):
FAMILY_ALLOWED = {
    "model/config.py": "the knob itself",
    "model/families.py": "family → module class (the model registry)",
    "model/presets.py": "parameter and FLOP counts differ per architecture",
    "model/baselines/rnn.py": "which recurrent cell (lstm, gru, rnn)",
    "train/run.py": "a parent run's family, to refuse train.init_from across families",
}


def sources(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def imported_packages(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "plutao" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_model_imports_nothing_from_train_tokenizer_or_experiments():
    bad = {path: imported_packages(tree) & {"train", "tokenizer", "experiments"} for path, tree in sources("model")}
    assert {p: b for p, b in bad.items() if b} == {}


def test_nothing_outside_experiments_imports_experiments():
    bad = {path: "experiments" for pkg in ("model", "train", "tokenizer") for path, tree in sources(pkg)
           if "experiments" in imported_packages(tree)}
    assert bad == {}


def reads_family(node) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr == "family"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "family"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "family"
    return False


def family_reads(tree) -> int:
    """`.family` attributes and "family" keys read in code (not in strings or comments)."""
    return sum(reads_family(node) for node in ast.walk(tree))


def test_family_is_read_only_in_the_task_registry_and_the_places_readme_names():
    reads = {path: family_reads(tree) for pkg in PACKAGES for path, tree in sources(pkg)}
    outside = {p: n for p, n in reads.items() if n and not p.startswith("train/tasks/") and p not in FAMILY_ALLOWED}
    assert outside == {}
    readme = (ROOT / "README.md").read_text()
    for path in FAMILY_ALLOWED:
        assert path in readme, f"README does not say why {path} reads model.family"
