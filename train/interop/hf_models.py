"""Hugging Face checkpoints in plutao's terms: config.json ↔ ModelConfig, and each parameter ↔ the
tensors it is made of, for every architecture in LAYOUTS (one module each: hf_gpt2.py, hf_llama.py).
A new architecture is a new module with the same five functions (read_config, write_config, fits,
import_plan, export_plan), listed here; nothing else branches on the architecture.
"""

from __future__ import annotations

from plutao.model.config import ModelConfig
from plutao.train.config.errors import UserError
from plutao.train.interop import hf_gpt2, hf_llama

LAYOUTS = {layout.ARCH: layout for layout in (hf_gpt2, hf_llama)}
ARCHITECTURES = tuple(LAYOUTS)


def architecture(config: dict, where: str) -> str:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    by_type = {layout.MODEL_TYPE: arch for arch, layout in LAYOUTS.items()}
    arch = archs[0] if archs else by_type.get(model_type, "")
    if arch not in LAYOUTS:
        named = arch or (f"model_type {model_type!r}" if model_type else "no architecture")
        raise UserError(f"{where}: {named} is not supported; plutao imports {' and '.join(ARCHITECTURES)} checkpoints")
    return arch


def model_config(config: dict, where: str, context: int = 0) -> tuple[str, ModelConfig, list[str]]:
    """(architecture, our config, notes) for a Hugging Face config.json."""
    arch = architecture(config, where)
    try:
        cfg, notes = LAYOUTS[arch].read_config(config, where, context)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json lacks or garbles {e} for a {arch}; it is not a complete "
                        "transformers config") from None
    problems = cfg.problems()
    if problems:
        raise UserError(f"{where}: {problems[0]}")
    return arch, cfg.resolved(), notes


def hf_config(cfg: ModelConfig, arch: str, specials: dict) -> dict:
    """config.json for `cfg` as `arch` (the inverse of `model_config`)."""
    return LAYOUTS[arch].write_config(cfg.resolved(), specials)


def export_architecture(cfg: ModelConfig) -> str:
    """The layout a plutao model exports to, or a one-line error naming what none has."""
    cfg = cfg.resolved()
    if cfg.family != "decoder":
        raise UserError(f"a model.family={cfg.family} model has no Hugging Face causal-LM layout; export-hf writes decoders")
    for arch, layout in LAYOUTS.items():
        if layout.fits(cfg):
            return arch
    have = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("positions", "norm_type", "norm", "activation", "bias"))
    shapes = " nor ".join(f"{layout.NAME}'s layout ({layout.SHAPE})" for layout in LAYOUTS.values())
    raise UserError(f"this model ({have}) matches neither {shapes}; export-hf writes those")


def import_plan(arch: str, cfg: ModelConfig, names: set[str]) -> dict:
    """{our parameter path: (the checkpoint tensors it needs, build(get) → our array)}."""
    return LAYOUTS[arch].import_plan(cfg, names)


def export_plan(arch: str, cfg: ModelConfig) -> list:
    """[(tensor name, make(get) → the tensor from our parameters)] in the order the file holds them."""
    return LAYOUTS[arch].export_plan(cfg)
