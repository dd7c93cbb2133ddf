"""Sources, the tokenized cache, downloads from a local URL, optimizers and schedules."""

import json
import zipfile

import jax
import numpy as np
import pytest

from plutao.model.config import ModelConfig
from plutao.model.heads import forward_logits
from plutao.tokenizer import CharTokenizer
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config, DataConfig, MeshConfig, OptimConfig, apply_overrides
from plutao.train.data import corpora
from plutao.train.data.sources import read_documents, tokenize_documents
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel.sharding import make_mesh
from plutao.train.step import Trainer


def test_folder_and_jsonl_sources(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "sub" / "b.txt").write_text("second document")
    (folder / "skip.md").write_text("not matched")
    assert read_documents(str(folder), DataConfig()) == ["first document", "second document"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert read_documents(str(jsonl), DataConfig(jsonl_field="body")) == ["one", "two"]
    with pytest.raises(UserError, match="data.jsonl_field"):
        read_documents(str(jsonl), DataConfig())
    with pytest.raises(UserError, match="no files matching"):
        read_documents(str(folder), DataConfig(glob="*.csv"))


def test_token_cache_is_keyed_by_content_and_tokenizer(tmp_path):
    docs = ["hello world", "second doc"]
    tok = CharTokenizer.train(docs)
    tokens = tokenize_documents(docs, tok, tmp_path)
    assert list(tokens[:5]) == tok.encode("hello")
    assert tokens[len("hello world")] == tok.eot_id and tokens[-1] == tok.eot_id
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1
    again = tokenize_documents(docs, tok, tmp_path)
    assert isinstance(again, np.memmap) and np.array_equal(again, tokens)
    tokenize_documents(["hello world", "second ode"], tok, tmp_path)
    tokenize_documents(docs, CharTokenizer.train(docs + ["xyz"]), tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 3


def test_zipped_download_from_a_local_url(tmp_path, monkeypatch):
    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("wikitext-2-raw/wiki.train.raw", " = Title = \n text of the article \n")
    monkeypatch.setitem(corpora.DOWNLOADS, "wikitext2", (archive.as_uri(), "wikitext-2-raw/wiki.train.raw"))
    path = corpora.download("wikitext2", tmp_path / "cache")
    assert path.read_text().startswith(" = Title =")
    assert read_documents("wikitext2", DataConfig(cache_dir=str(tmp_path / "cache")))[0].startswith(" = Title")


def test_schedules():
    cos = lr_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine"), 110)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1e-3) and float(cos(110)) == pytest.approx(1e-4)
    lin = lr_schedule(OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=10, schedule="linear"), 110)
    assert float(lin(60)) == pytest.approx(5e-4)
    inv = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=100, schedule="inverse_sqrt"), 1000)
    assert float(inv(50)) == pytest.approx(5e-4)
    assert float(inv(100)) == pytest.approx(1e-3)
    assert float(inv(400)) == pytest.approx(5e-4)  # ∝ 1/√step after warmup


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "lion"])
def test_every_optimizer_learns(name):
    cfg = ModelConfig(vocab_size=32, context_length=16, n_layers=1, d_model=32, n_heads=2).resolved()
    lr = {"sgd": 0.5, "lion": 3e-3}.get(name, 1e-2)
    optim = OptimConfig(name=name, lr=lr, warmup_steps=0, schedule="constant")
    trainer = Trainer(cfg, make_optimizer(optim, 100, cfg), lr_schedule(optim, 100), make_mesh(MeshConfig()), 0)
    state = trainer.init_state()
    batch = np.random.default_rng(0).integers(0, 32, (8, 17)).astype(np.int32)
    losses = []
    for _ in range(30):
        state, m = trainer.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, those inside nested jaxprs (jit, custom_jvp, scan, ...) included."""
    from jax.extend import core as jcore

    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _all_eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _all_eqns(sub)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    cfg32 = ModelConfig(vocab_size=32, context_length=16, n_layers=2, d_model=64, n_heads=2).resolved()
    optim = OptimConfig(lr=3e-3, warmup_steps=0)
    batch = np.random.default_rng(0).integers(0, 32, (8, 17)).astype(np.int32)
    final, logits = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = ModelConfig(**{**cfg32.__dict__, "dtype": dtype})
        trainer = Trainer(cfg, make_optimizer(optim, 50, cfg), lr_schedule(optim, 50), make_mesh(MeshConfig()), 0)
        state = trainer.init_state()
        # The compute dtype is really used: the forward's matmuls take bf16 operands (and only then),
        # the softmax's exp stays float32, and the logits come back float32.
        forward = jax.make_jaxpr(lambda p, t=trainer: forward_logits(t.model(p), batch[:, :-1])[0])(state["params"])
        eqns = list(_all_eqns(forward.jaxpr))
        dots = [[str(v.aval.dtype) for v in e.invars] for e in eqns if e.primitive.name == "dot_general"]
        assert len(dots) >= 4 * cfg.n_layers + 1, dots  # QKV, scores, AV, W_O, 2 MLP per layer + head
        assert all(d == ["bfloat16", "bfloat16"] if dtype == "bfloat16" else d == ["float32", "float32"]
                   for d in dots), (dtype, dots)
        exps = [str(e.outvars[0].aval.dtype) for e in eqns if e.primitive.name == "exp"]
        assert exps and set(exps) == {"float32"}, exps
        assert forward.out_avals[0].dtype == np.float32
        # ... and in the compiled train step too.
        step_hlo = trainer.train_step.lower(state, batch).as_text()
        bf16_dots = [line for line in step_hlo.splitlines() if "dot_general" in line and "bf16" in line]
        assert (len(bf16_dots) >= len(dots)) if dtype == "bfloat16" else not bf16_dots, len(bf16_dots)
        logits[dtype] = np.asarray(forward_logits(trainer.model(state["params"]), batch[:, :-1])[0])
        for _ in range(50):
            state, m = trainer.train_step(state, batch)
        assert all(p.dtype == np.float32 for p in jax.tree.leaves(state["params"]))
        final[dtype] = float(m["loss"])
    # Same initial parameters: bf16 logits differ from float32's by far more than float32 round-off
    # (~1e-6 here), but only by bf16's own rounding.
    gap = np.abs(logits["bfloat16"] - logits["float32"]).max()
    assert 1e-3 < gap < 0.05, gap
    # bf16 has an 8-bit mantissa; after 50 steps the loss stays within 5% of float32's.
    assert final["bfloat16"] == pytest.approx(final["float32"], rel=0.05)


def test_config_file_and_roundtrip(tmp_path):
    from plutao.train.config.schema import load_config_file

    f = tmp_path / "c.toml"
    f.write_text('[model]\nn_layers = 3\npositions = "rotary"\n[optim]\nlr = 3e-4\n')
    cfg = apply_overrides(Config(), load_config_file(f))
    assert cfg.model.n_layers == 3 and cfg.model.positions == "rotary" and cfg.optim.lr == 3e-4
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    f.write_text("[model]\nn_layers = 'x'\n")
    with pytest.raises(UserError, match="model.n_layers expects an integer"):
        apply_overrides(Config(), load_config_file(f))
