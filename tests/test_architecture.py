"""The layering the code promises (README: "Where things are"; train/__init__.py): model/ is plain model math, the
experiments layer sits on top of everything, and only the task registry asks which family a run is."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "train", "tokenizer", "experiments", "tools")
# Where `family` may still be read outside train/tasks/, and why (README lists the same places):
FAMILY_ALLOWED = {
    "model/config.py": "the knob itself",
    "model/families.py": "family → module class (the model registry)",
    "model/counts.py": "parameter and FLOP counts differ per architecture",
    "model/baselines/rnn.py": "which recurrent cell (lstm, gru, rnn)",
    "train/run/lineage.py": "a parent run's family, to refuse train.init_from across families",
    "train/interop/hf_models.py": "only a decoder has a Hugging Face causal-LM layout to export to",
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


def test_tools_import_nothing_else_of_plutao():
    assert {path: imported_packages(tree) - {"tools"} for path, tree in sources("tools")
            if imported_packages(tree) - {"tools"}} == {}


def test_nothing_outside_experiments_imports_experiments():
    bad = {path: "experiments" for pkg in ("model", "train", "tokenizer", "tools") for path, tree in sources(pkg)
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
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    for path in FAMILY_ALLOWED:
        assert path in docs, f"neither README nor docs/ say why {path} reads model.family"


# Inside train/, imports point one way: a module may import modules of its own layer or of layers
# listed before it, never after (train/__init__.py draws the same picture). `if TYPE_CHECKING:` blocks
# (annotations only) are not imports at run time and are not counted.
TRAIN_LAYERS = [
    ["config.errors", "config.presets", "losses", "rl.objectives", "worlds.arith", "worlds.arith_prompts", "run.metrics"],
    ["config.schema"],
    ["parallel.sharding", "parallel.distributed", "optim", "run.rundir", "run.lock", "run.checkpoint",
     "interop.safetensors_io", "interop.hf_layout", "interop.hf_gpt2", "interop.hf_llama", "interop.hf_models",
     "interop.hf_tokenizer"],
    ["run.resume"],
    ["data.corpora", "data.sources", "data.batches", "data.chat_batches", "data.conversations", "data.pairs"],
    ["eval.likelihood", "eval.translate", "eval.reward_model", "rl.rollouts", "rl.comparisons"],
    ["tasks"],
    ["step"],
    ["run.lineage", "ngram_run", "interop.hf_run"],
    ["prepare", "rl.rewards"],
    ["rl.loop"],
    ["loop"],
]


def train_module(path: Path) -> str:
    parts = path.relative_to(ROOT / "train").with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def train_imports(tree) -> set[str]:
    """The train/ modules a file imports (`from plutao.train.data import sources` → data.sources)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
            "TYPE_CHECKING" for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if isinstance(node, ast.ImportFrom):  # (a name may itself be a module: from plutao.train.data import sources)
            modules += [f"{node.module}.{a.name}" for a in node.names]
        for name in modules:
            if name.startswith("plutao.train."):
                rel = name.removeprefix("plutao.train.")
                path = ROOT / "train" / rel.replace(".", "/")
                if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
                    out.add(rel)
    return out


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(TRAIN_LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return None


def layer_violations() -> dict[str, list[str]]:
    bad = {}
    for path in sorted((ROOT / "train").rglob("*.py")):
        module = train_module(path)
        own = layer_of(module)
        if own is None:
            continue
        up = sorted(m for m in train_imports(ast.parse(path.read_text()))
                    if (layer := layer_of(m)) is not None and layer > own)
        if up:
            bad[module] = up
    return bad


def test_every_train_module_has_a_layer():
    packages = {train_module(p) for p in (ROOT / "train").rglob("__init__.py")}
    modules = {train_module(p) for p in (ROOT / "train").rglob("*.py")} - packages
    assert sorted(m for m in modules if layer_of(m) is None) == []


def test_imports_inside_train_point_one_way():
    assert layer_violations() == {}


def test_the_layer_check_can_fail():
    tree = ast.parse("from plutao.train.loop import train\nfrom plutao.train.rl import objectives\n"
                     "if TYPE_CHECKING:\n    from plutao.train.step import Trainer\n")
    assert train_imports(tree) == {"loop", "rl.objectives", "rl"}
    assert layer_of("loop") > layer_of("data.sources") > layer_of("config.schema")


def test_every_train_subpackage_says_what_it_may_import():
    for init in (ROOT / "train").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if init.parent == ROOT / "train":  # (train/__init__.py draws the whole order instead)
            assert "imports point one way" in doc
            continue
        assert "import" in doc, f"{init.relative_to(ROOT)} does not say what it may import"
