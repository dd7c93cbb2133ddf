"""`plutao import-hf` and `plutao export-hf`: a Hugging Face checkpoint directory ↔ a run directory.

Import writes a run like any other (config.json, tokenizer/, checkpoints/0 holding parameters only)
into a temporary directory beside --workdir and renames it into place when everything is written, so
a failure leaves nothing. Each parameter is read from the memory-mapped safetensors, converted to
float32 and placed with its target sharding before the next is read: the host never holds the model
twice. The lineage says where it came from (`imported`).

Export restores a run's parameters (a LoRA run's base with its adapters added, as every command
serves it; `plutao merge-lora` writes the same weights as a run) and streams
them into model.safetensors in the layout the architecture names, with config.json, the tokenizer and
a chat template, into a temporary directory renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from plutao.tokenizer.chat import template_hash
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config, DataConfig, TrainConfig
from plutao.train.interop import hf_models, safetensors_io
from plutao.train.interop.hf_tokenizer import export_tokenizer, has_chat_roles, import_tokenizer, read_json
from plutao.train.parallel import sharding
from plutao.train.run.checkpoint import Checkpoints
from plutao.train.step import Trainer
from plutao.train.tasks import task_for

# Tensors a checkpoint may hold that are not parameters (buffers older transformers saved).
BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@contextlib.contextmanager
def staged(target: Path, what: str):
    """A temporary directory beside `target`, renamed to it on success and removed on failure."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists and is not empty; {what} writes a new directory (choose another)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_hf_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass a Hugging Face checkpoint directory (config.json, "
                        "model.safetensors, tokenizer.json)")
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} has no config.json; pass the directory transformers' save_pretrained wrote")
    return read_json(path)


@dataclasses.dataclass
class Imported:
    run_dir: Path
    architecture: str
    n_params: int
    checkpoint_bytes: int
    seconds: float
    notes: list[str]


def import_hf(directory: Path, workdir: Path, *, context: int = 0, seed: int = 0) -> Imported:
    t0 = time.perf_counter()
    directory, workdir = Path(directory), Path(workdir)
    where = str(directory)
    config = read_hf_config(directory)
    arch, model, notes = hf_models.model_config(config, where, context)
    checkpoint = safetensors_io.Checkpoint(directory)
    tokenizer, chat_note = import_tokenizer(directory, config)
    notes.append(chat_note)
    if tokenizer.vocab_size > model.vocab_size:
        raise UserError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model {model.vocab_size} "
                        "embedding rows; they do not belong together")
    names = set(checkpoint.names())
    plan = hf_models.import_plan(arch, model, names)
    cfg = Config(data=DataConfig(tokenizer="hf"), model=model, train=TrainConfig(seed=seed))
    task = task_for(cfg, tokenizer)
    mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1))
    trainer = Trainer(model, None, None, mesh, seed, task=task)
    target = trainer.abstract_sharded_state()["params"]
    leaves = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    if set(leaves) != set(plan):  # (a mismatch here is ours, not the checkpoint's)
        raise AssertionError(sorted(set(leaves) ^ set(plan)))
    # Every tensor present with the shape the config implies, before anything is read or written.
    for path, (sources, build) in plan.items():
        for name in sources:
            if name not in names:
                raise UserError(f"{where}: the checkpoint lacks {name}, which a {arch} with this config.json has; "
                                "the weights and the config do not belong together")
        shape = _built_shape(build, checkpoint.shape)
        if shape != tuple(leaves[path].shape):
            raise UserError(f"{where}: {', '.join(sources)} has shape {checkpoint.shape(sources[0])}, but config.json "
                            f"implies a tensor for our {tuple(leaves[path].shape)}; the weights and the config do not "
                            "belong together")
    used = {n for sources, _ in plan.values() for n in sources}
    unused = sorted(n for n in names - used if not n.endswith(BUFFERS))
    if unused == ["lm_head.weight"] and model.tie_embeddings:  # (a tied head saved anyway: it must be the embedding)
        embedding = next(n for n in plan[("token_embed",)][0])
        if checkpoint.shape("lm_head.weight") != checkpoint.shape(embedding) or not np.array_equal(
                checkpoint.get("lm_head.weight"), checkpoint.get(embedding)):
            raise UserError(f"{where}: config.json ties the output head to the embedding (tie_word_embeddings), but "
                            "the checkpoint's lm_head.weight differs from it; set tie_word_embeddings=false or drop it")
        unused = []
    if unused:
        raise UserError(f"{where}: the checkpoint has {len(unused)} tensors a {arch} with this config.json does not "
                        f"({unused[0]}, ...); it is another architecture or config")
    with staged(workdir, "import-hf") as tmp:
        params: dict = {}
        for path, (_, build) in plan.items():
            array = np.asarray(build(checkpoint.get), dtype=np.float32)
            _nested_set(params, path, jax.device_put(array, leaves[path].sharding))
            del array
        tokenizer.save(tmp / "tokenizer")
        saved = cfg.to_dict()
        saved["provenance"] = {"tokenizer_fingerprint": tokenizer.fingerprint, "command": ["plutao", "import-hf", where],
                               "versions": _versions()}
        saved["lineage"] = {"imported": {"from": str(directory.absolute()), "architecture": arch,
                                         "config_sha256": hashlib.sha256((directory / "config.json").read_bytes())
                                         .hexdigest()[:16], "notes": notes},
                            "template_hash": template_hash(tokenizer) if has_chat_roles(tokenizer) else None}
        (tmp / "config.json").write_text(json.dumps(saved, indent=1) + "\n")
        checkpoints = Checkpoints(tmp / "checkpoints", async_save=False, compress=False)
        checkpoints.save(0, {"params": params}, {"val_loss": None, "train_seconds": 0.0, "nonfinite_steps": 0})
        checkpoints.close()
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        del params
    return Imported(workdir, arch, n_params, checkpoint.nbytes(), time.perf_counter() - t0, notes)


def _built_shape(build, shape_of) -> tuple[int, ...]:
    """The shape `build` makes, from zero-strided stand-ins of the tensors it reads (nothing is read)."""
    def get(name):
        shape = tuple(shape_of(name))
        return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))
    try:
        return tuple(build(get).shape)
    except ValueError:
        return (-1,)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("plutao", "jax", "flax", "orbax-checkpoint", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _nested_set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


@dataclasses.dataclass
class Exported:
    out: Path
    architecture: str
    n_params: int
    nbytes: int
    seconds: float
    note: str | None = None


def export_hf(run, out: Path) -> Exported:
    """Write the run `run` (train/run/lineage.py: LoadedRun, best loaded `lazy`: each parameter is then
    read from the checkpoint as its tensor is written) to `out` as a transformers checkpoint."""
    t0 = time.perf_counter()
    out = Path(out)
    model = run.cfg.model.resolved()
    arch = hf_models.export_architecture(model)

    def located(path):  # (scanned layers: block i is row i of the stacked parameters)
        if model.scan_layers and path[0] == "blocks":
            return ("blocks", *path[2:]), path[1]
        return path, None

    def get(path):
        where, i = located(path)
        array = run.param(where)
        return np.asarray(array if i is None else array[i], np.float32)

    def shape_of(path):
        where, i = located(path)
        shape = run.param_shape(where)
        return shape if i is None else shape[1:]

    plan = hf_models.export_plan(arch, model)
    with staged(out, "export-hf") as tmp:
        ids, note = export_tokenizer(run.tokenizer, tmp)
        shapes = {name: _built_shape(make, shape_of) for name, make in plan}
        safetensors_io.write(tmp / safetensors_io.SINGLE,
                             [(name, shapes[name], np.float32, lambda make=make: make(get)) for name, make in plan],
                             {"format": "pt"})
        config = hf_models.hf_config(model, arch, ids)
        config["transformers_version"] = _transformers_version()
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        gen = {k: v for k, v in ids.items() if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")
        nbytes = (tmp / safetensors_io.SINGLE).stat().st_size
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    return Exported(out, arch, n_params, nbytes, time.perf_counter() - t0, note)


def _transformers_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "4.57.0"
