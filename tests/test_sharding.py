"""Parallelism from one axis table: identical losses on every mesh, FSDP memory, goldens, mesh errors."""

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import forced_devices

from plutao.experiments.shardings import dumps, sharding_dump
from plutao.train.config.schema import resolve_config

GOLDENS = Path(__file__).parent / "goldens"
CASES = {
    "tiny-data8": ("tiny", ["mesh.data=8"], 8),
    "gpt2-124m-fsdp8": ("gpt2-124m", ["mesh.data=1", "mesh.fsdp=8"], 8),
    "gpt2-124m-tensor8": ("gpt2-124m", ["mesh.data=1", "mesh.tensor=8"], 8),
    "gpt2-124m-data2-fsdp2-tensor2": ("gpt2-124m", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
    "gpt3-6.7b-fsdp64": ("gpt3-6.7b", ["mesh.data=1", "mesh.fsdp=64"], 64),
    # Grouped-query attention: 8 key/value heads split over tensor=8 (and left whole at tensor=16).
    "llama-1b-fsdp2-tensor8": ("llama-1b", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=8"], 16),
    "llama-1b-tensor16": ("llama-1b", ["mesh.data=1", "mesh.tensor=16"], 16),
}


@pytest.mark.parametrize("name", CASES)
def test_sharding_goldens(name):
    preset, overrides, devices = CASES[name]
    golden = GOLDENS / f"shardings-{name}.json"
    current = dumps(sharding_dump(resolve_config(preset, overrides)[1], devices))
    if current != golden.read_text():
        diff = "".join(difflib.unified_diff(golden.read_text().splitlines(True), current.splitlines(True),
                                            str(golden), "now"))
        pytest.fail(f"shardings changed; if intended, regenerate with `plutao shardings {preset} "
                    f"{' '.join(overrides)} --devices {devices} --out {golden}`:\n{diff}")


def test_megatron_layout_of_the_resolved_specs():
    # Resolved now from the axis table and the model's axis names (not read from a golden).
    preset, overrides, devices = CASES["gpt2-124m-data2-fsdp2-tensor2"]
    dump = sharding_dump(resolve_config(preset, overrides)[1], devices)
    assert dump["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    specs = dump["params"]
    for i in range(12):  # every block, not only the first
        assert specs[f"blocks/{i}/attn/w_qkv"] == ["fsdp", None, "tensor", None]  # column-parallel over heads
        assert specs[f"blocks/{i}/attn/w_o"] == ["tensor", None, "fsdp"]  # row-parallel
        assert specs[f"blocks/{i}/mlp/w_in"] == ["fsdp", "tensor"]  # column-parallel
        assert specs[f"blocks/{i}/mlp/w_out"] == ["tensor", "fsdp"]  # row-parallel
    assert not any(k.startswith("blocks/12/") for k in specs)
    assert specs["token_embed"] == [None, "fsdp"]  # 50257 is not divisible by 2: the vocab stays whole
    assert dump["activations"]["q/k/v_BTHK"] == [["data", "fsdp"], None, "tensor", None]
    assert dump["activations"]["mlp hidden_NF"] == [["data", "fsdp"], "tensor"]
    assert dump["batch"] == [["data", "fsdp"], None]
    # A mesh axis never splits a dimension it does not divide: 76 stays whole under tensor=8, 80 is split.
    for vocab, expected in ((76, [None, None]), (80, ["tensor", None])):
        cfg = resolve_config("gpt2-124m", ["mesh.data=1", "mesh.tensor=8", f"model.vocab_size={vocab}"])[1]
        assert sharding_dump(cfg, 8)["params"]["token_embed"] == expected, vocab


MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from plutao.train.config.presets import PRESETS
from plutao.train.config.schema import Config, apply_overrides
from plutao.train.config.errors import UserError
from plutao.train.prepare import prepare
from plutao.train.step import global_batch

assert jax.device_count() == 8
base = dict(PRESETS["tiny"]) | {"data.path": sys.argv[1], "model.n_heads": 8, "model.d_model": 64,
                                "train.batch_size": 16, "model.context_length": 32}
out = {"losses": {}, "bytes": {}, "errors": {}}
meshes = {"one": {"mesh.data": 1}, "data8": {"mesh.data": 8}, "fsdp8": {"mesh.data": 1, "mesh.fsdp": 8},
          "tensor8": {"mesh.data": 1, "mesh.tensor": 8},
          "data2xfsdp2xtensor2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}}
for name, mesh in meshes.items():
    p = prepare(apply_overrides(Config(), base | mesh), None, devices=jax.devices()[:1] if name == "one" else None)
    state = p.trainer.init_state()
    per_device = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(state["params"]))
    out["bytes"][name] = per_device
    losses = []
    for step in range(10):
        state, m = p.trainer.train_step(state, global_batch(p.batches.train_rows(step), p.trainer.mesh))
        losses.append(float(m["loss"]))
    out["losses"][name] = losses
bad = {"not-multiplying": {"mesh.data": 3, "mesh.fsdp": 2}, "batch": {"mesh.data": 8, "train.batch_size": 12},
       "heads": {"mesh.data": 1, "mesh.tensor": 8, "model.n_heads": 4}}
for name, mesh in bad.items():
    try:
        prepare(apply_overrides(Config(), base | mesh), None)
        out["errors"][name] = None
    except UserError as e:
        out["errors"][name] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_results(small_corpus):
    env = forced_devices(8)
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(small_corpus)], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "tensor8", "data2xfsdp2xtensor2"])
def test_every_mesh_gives_the_same_losses(mesh_results, mesh):
    np.testing.assert_allclose(mesh_results["losses"][mesh], mesh_results["losses"]["one"], rtol=1e-5)


def test_fsdp_shrinks_parameter_bytes_per_device(mesh_results):
    full, fsdp = mesh_results["bytes"]["one"], mesh_results["bytes"]["fsdp8"]
    assert mesh_results["bytes"]["data8"] == full  # data parallelism replicates
    # Everything with an `embed` axis is split 8 ways; only tiny vectors whose size 8 does not divide stay whole.
    assert fsdp < full / 8 * 1.05


def test_mesh_errors_before_compiling(mesh_results):
    errors = mesh_results["errors"]
    assert "multiplies to 6, but there are 8 devices" in errors["not-multiplying"]
    assert "not divisible by the 8 data-parallel devices" in errors["batch"]
    assert "model.n_heads=4 is not divisible by mesh.tensor=8" in errors["heads"]
    assert all("\n" not in e for e in errors.values())


@pytest.mark.slow  # (64 forced devices compile a 6.7B step: the goldens above cover its specs)
def test_plan_gpt3_6_7b_on_64_forced_devices():
    result = subprocess.run([sys.executable, "-m", "plutao.experiments", "plan", "gpt3-6.7b", "mesh.fsdp=64",
                             "--devices", "64", "--device-memory", "80GB", "--json"], capture_output=True, text=True,
                            check=False, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["devices"] == 64 and plan["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
    n_params = 6_658_404_352
    assert plan["params_bytes"] == pytest.approx(n_params * 4 / 64, rel=0.01)  # FSDP: 1/64 of the f32 weights
    assert plan["opt_state_bytes"] == pytest.approx(2 * plan["params_bytes"], rel=0.01)  # Adam's two moments
    assert plan["temp_bytes"] > 0 and plan["fits"] is False


def test_plan_rejects_a_bad_memory_size(capsys):
    from plutao.experiments.cli import main

    assert main(["plan", "tiny", "--device-memory", "lots"]) == 2
    assert "is not a size" in capsys.readouterr().err
