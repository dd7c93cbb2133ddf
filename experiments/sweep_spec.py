"""A sweep's specification: the spec file or command-line flags, read and checked into a `SweepSpec`
(base config, overrides, grid / zip / trials / ablations / random / Optuna variants, seeds, budgets,
executor). Running it is experiments/sweep.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from plutao.train.config.errors import UserError
from plutao.train.config.schema import load_config_file, parse_overrides

SPEC_KEYS = {"base", "overrides", "grid", "zip", "trials", "ablations", "random", "optuna", "seeds", "parallel",
             "max_steps", "max_seconds", "executor", "slurm", "name"}


@dataclasses.dataclass
class SweepSpec:
    base: str | None = None  # a preset name or config file; None = the default experiment
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # applied to every trial
    grid: dict[str, list] = dataclasses.field(default_factory=dict)  # every combination
    zip: dict[str, list] = dataclasses.field(default_factory=dict)  # varied together, row by row
    trials: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # explicit override sets
    ablations: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # named variants
    random: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"budget": N, "seed": S, "params": {...}}
    optuna: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"trials": N, "params": {...}, ...}
    seeds: int = 1
    parallel: int = 1
    max_steps: int = 0  # per-trial budgets (0 = the config's train.steps / no time limit)
    max_seconds: float = 0.0
    executor: str = "local"  # local | slurm
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""

    def validate(self) -> None:
        for name, kind in (("seeds", int), ("parallel", int), ("max_steps", int), ("max_seconds", (int, float)),
                           ("overrides", dict), ("grid", dict), ("zip", dict), ("trials", list), ("ablations", dict),
                           ("random", dict), ("optuna", dict), ("slurm", dict)):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UserError(f"sweep key {name} has the wrong type ({type(value).__name__}: {value!r}); see "
                                "`plutao sweep --help` for the spec format")
        if any(not isinstance(v, dict) for v in [*self.trials, *self.ablations.values()] if v is not None):
            raise UserError("every entry of trials/ablations must be a mapping of section.key: value")
        if "train.seed" in {**self.grid, **self.zip}:
            raise UserError("train.seed is not a sweep axis; use --seeds N (seeds 0..N-1 for every variant)")
        if self.max_steps < 0 or self.max_seconds < 0:
            raise UserError(f"--max-steps and --max-seconds must be ≥ 0, got {self.max_steps}, {self.max_seconds}")
        for section in ("random", "optuna"):
            for key in ("budget", "trials", "seed"):
                if key in getattr(self, section) and not isinstance(getattr(self, section)[key], int):
                    raise UserError(f"{section}.{key} must be an integer, got {getattr(self, section)[key]!r}")
        if self.seeds < 1 or self.parallel < 1:
            raise UserError(f"--seeds and --parallel must be ≥ 1, got seeds={self.seeds}, parallel={self.parallel}")
        if self.executor not in ("local", "slurm"):
            raise UserError(f"executor {self.executor!r} is not known; use local or slurm")
        for key, values in {**self.grid, **self.zip}.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"sweep values for {key} must be a non-empty list, got {values!r}")
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            raise UserError(f"zip lists must have equal lengths, got {sorted(lengths)}")
        if self.random and self.optuna:
            raise UserError("a sweep uses random search or an Optuna study, not both")
        for section in ("random", "optuna"):
            spec = getattr(self, section)
            if spec and not spec.get("params"):
                raise UserError(f"{section} search needs params, e.g. {{optim.lr: {{loguniform: [1e-4, 1e-2]}}}}")
            for key, dist in spec.get("params", {}).items():
                _check_distribution(key, dist)


def _check_distribution(key: str, dist) -> None:
    shape = ("must be one of {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {int: [lo, hi]}, {choice: [a, b, ...]}; "
             f"got {dist!r}")
    if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in ("uniform", "loguniform", "choice",
                                                                                "int")):
        raise UserError(f"the distribution of {key} {shape}")
    (kind, args), = dist.items()
    if not isinstance(args, list) or not args:
        raise UserError(f"the distribution of {key} {shape}")
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise UserError(f"the distribution of {key} needs two numbers [lo, hi], got {args!r}")
        if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
            raise UserError(f"the distribution of {key} needs lo < hi" + (" and lo > 0" if kind == "loguniform" else "")
                            + f", got {args!r}")


def load_spec(path: Path) -> SweepSpec:
    """A sweep spec from YAML, JSON, TOML, or a Python file defining SWEEP = {...}."""
    return spec_from_dict(_read_spec_file(path), str(path))


def _read_spec_file(path: Path):
    """The raw mapping of a spec file; any parse error becomes one line naming the file."""
    if not path.is_file():
        raise UserError(f"sweep spec {str(path)!r} does not exist")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(path.read_text())
        elif path.suffix == ".json":
            raw = json.loads(path.read_text())
        elif path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(path.read_text())
        elif path.suffix == ".py":
            import runpy

            raw = runpy.run_path(str(path)).get("SWEEP")
        else:
            raise UserError(f"sweep spec {str(path)!r} must be .yaml, .json, .toml or .py")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (any parse error in a user's file: say where, in one line)
        raise UserError(f"cannot read sweep spec {str(path)!r}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    return raw


def spec_from_dict(raw, where: str) -> SweepSpec:
    if not isinstance(raw, dict):
        raise UserError(f"{where} must define a mapping (a Python file: SWEEP = {{...}})")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        import difflib

        key = min(unknown)
        close = difflib.get_close_matches(key, sorted(SPEC_KEYS), n=1)
        raise UserError(f"{where}: unknown sweep key {key!r}" + (f"; did you mean {close[0]}?" if close else
                                                                 f"; known keys: {', '.join(sorted(SPEC_KEYS))}"))
    spec = SweepSpec(**raw)
    spec.validate()
    return spec


def parse_values(raw: str) -> list:
    """`1e-3,3e-4` → [0.001, 0.0003]; `pre,post` → ["pre", "post"] (values stay strings unless numeric)."""
    out = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(int(item))
        except ValueError:
            try:
                out.append(float(item))
            except ValueError:
                out.append(item)
    return out


def parse_axis(arg: str, flag: str) -> tuple[str, list]:
    key, eq, values = arg.partition("=")
    if not eq or not key or not values:
        raise UserError(f"cannot read {flag} {arg!r}; write {flag} section.key=v1,v2 (e.g. {flag} optim.lr=1e-3,3e-4)")
    return key.strip(), parse_values(values)


def parse_distribution(arg: str) -> tuple[str, dict[str, list]]:
    """`optim.lr=loguniform:1e-4:1e-2` → ("optim.lr", {"loguniform": [0.0001, 0.01]}), the spec's form of a
    distribution; `choice:pre,post` lists strings. The bounds are checked with the spec (`validate`)."""
    key, _, dist = arg.partition("=")
    kind, _, bounds = dist.partition(":")
    values = bounds.split(":") if kind != "choice" else bounds.split(",")
    if not key or kind not in ("uniform", "loguniform", "int", "choice") or not values:
        raise UserError(f"cannot read --random {arg!r}; write e.g. --random optim.lr=loguniform:1e-4:1e-2 "
                        "or --random model.norm=choice:pre,post")
    try:
        return key, {kind: values if kind == "choice" else [float(v) for v in values]}
    except ValueError:
        raise UserError(f"cannot read the bounds of --random {arg!r}; give numbers") from None


def _named_spec(config: str | None) -> SweepSpec:
    """The spec CONFIG names: a .yaml/.py file is always a sweep spec; a .json/.toml file is one when its
    top-level keys are sweep keys and it has no config sections, else it is the base train config (as is
    a preset name), swept by the flags alone."""
    path = Path(config) if config else None
    if path and path.suffix in (".yaml", ".yml", ".py"):
        return load_spec(path)
    if path and path.suffix in (".json", ".toml") and path.is_file():
        try:
            raw = _read_spec_file(path)
        except UserError:
            raw = None  # unreadable: the config reader below says why, in its words
        if isinstance(raw, dict) and set(raw) & (SPEC_KEYS - {"name"}) and not set(raw) & {"model", "train", "data"}:
            return spec_from_dict(raw, config)
        load_config_file(path)  # a train config: validated when resolved
    return SweepSpec(base=config)


def command_line_spec(config: str | None, overrides: list[str], *, grid_flags: list[str] | None,
                      zip_flags: list[str] | None, random_flags: list[str] | None, optuna: bool, budget: int,
                      settings: dict[str, Any]) -> tuple[SweepSpec, dict[str, str]]:
    """(spec, shared overrides) of `plutao sweep CONFIG [key=value ...] --grid/--zip/--random ...`: the flags
    add axes to the spec CONFIG names, and the non-None `settings` (seeds, parallel, ...) replace its own."""
    overrides = list(overrides)
    if config and "=" in config:  # `plutao sweep key=value ...` without a config
        config, overrides = None, [config, *overrides]
    spec = _named_spec(config)
    for flag, target, flags in (("--grid", spec.grid, grid_flags), ("--zip", spec.zip, zip_flags)):
        for arg in flags or []:
            key, values = parse_axis(arg, flag)
            target[key] = values
    if random_flags:
        params = dict(parse_distribution(arg) for arg in random_flags)
        search = {"params": params, "budget": budget, "trials": budget, "seed": 0}
        setattr(spec, "optuna" if optuna else "random", search)
    elif optuna:
        raise UserError("--optuna needs a search space: add --random key=loguniform:lo:hi ...")
    for name, value in settings.items():
        if value is not None:
            setattr(spec, name, value)
    spec.validate()
    return spec, parse_overrides(overrides)
