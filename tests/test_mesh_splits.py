"""What a mesh axis does to the parameters: which it splits, which stay whole and what that costs,
and an axis that would split nothing refused; `-1` given explicitly wins over mesh.data's default."""

import subprocess
import sys

import pytest

from plutao.model.counts import abstract_params
from plutao.train.config.errors import UserError
from plutao.train.config.schema import MeshConfig, resolve_config
from plutao.train.parallel import sharding


def report(preset: str, overrides: list[str], devices: int) -> sharding.SplitReport:
    _, cfg = resolve_config(preset, overrides)
    return sharding.split_report(abstract_params(cfg.shaped_model()), sharding.abstract_mesh(cfg.mesh, devices))


def test_a_vocabulary_the_tensor_axis_cannot_divide_stays_whole_and_its_cost_is_counted():
    r = report("gpt2-124m", ["mesh.data=2", "mesh.tensor=4"], 8)
    assert [(w.name, w.mesh_axis, w.logical, w.dim) for w in r.whole] == [("token_embed", "tensor", "vocab", 50257)]
    assert r.split["tensor"] == 72  # per layer W^Q/K/V, W^O, the two MLP matrices and the q/k/v and MLP-in biases
    table = 50257 * 768 * 4
    assert r.wasted_bytes() == int(table * 3 / 4) and r.wasted_bytes(moments=2) == int(table * 3 / 4 * 3)
    note = r.note(moments=2)
    assert "1 of 148 parameter tensors stay whole" in note and "vocab 50257 is not a multiple of mesh.tensor=4" in note
    assert "token_embed" in note and f"{table * 3 / 4 * 3 / 2**20:,.2f} MiB per device" in note
    r.check()  # the other parameters are split: a partial split is allowed, and told


def test_a_divisible_mesh_leaves_nothing_whole():
    r = report("gpt2-124m", ["mesh.data=1", "mesh.fsdp=8"], 8)
    # Everything with an embedding dimension is split; the q/k/v and MLP-in biases have none (nothing to tell).
    assert r.whole == [] and r.note() is None and r.split["fsdp"] == 148 - 2 * 12


def test_fsdp_that_shards_nothing_is_an_error_naming_the_dimension_and_the_sizes_that_divide_it():
    r = report("gpt3-13b", ["mesh.fsdp=64"], 64)
    assert r.split["fsdp"] == 0 and len(r.whole) == r.n_params - 2 * 40 == 404  # all with an embedding dimension
    with pytest.raises(UserError) as e:
        r.check()
    msg = str(e.value)
    assert "mesh.fsdp=64" in msg and "model.d_model=5140" in msg and "2, 4" in msg


def test_plan_refuses_it_in_one_line():
    result = subprocess.run([sys.executable, "-m", "plutao.experiments", "plan", "gpt3-13b", "mesh.fsdp=64",
                             "--devices", "64"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("plutao: error: mesh.fsdp=64 would shard no parameter") and "5140" in line


@pytest.mark.parametrize(("mesh", "expected"), [
    ({}, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"fsdp": -1}, {"data": 1, "fsdp": 8, "tensor": 1}),
    ({"tensor": -1}, {"data": 1, "fsdp": 1, "tensor": 8}),
    ({"fsdp": 2}, {"data": 4, "fsdp": 2, "tensor": 1}),
    ({"data": -1, "fsdp": 2}, {"data": 4, "fsdp": 2, "tensor": 1}),
    ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4, "tensor": 1}),
])
def test_an_explicit_minus_one_wins_over_the_data_default(mesh, expected):
    assert sharding.mesh_shape(MeshConfig(**mesh), 8) == expected
    _, cfg = resolve_config("tiny", [f"mesh.{k}={v}" for k, v in mesh.items()])
    assert sharding.mesh_shape(cfg.mesh, 8) == expected


def test_two_explicit_minus_ones_are_still_an_error():
    with pytest.raises(UserError, match="only one of mesh.data, mesh.fsdp may be -1"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
