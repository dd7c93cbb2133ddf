"""Runs from runs: `train.init_from=RUN[:STEP]` copies the parameters a new run shares with its parent,
initialises the rest fresh, refuses a backbone that does not fit, and records the lineage."""

import json

import numpy as np
import pytest

from plutao.model.heads import forward_logits
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config, apply_overrides
from plutao.train.loop import train
from plutao.train.prepare import prepare
from plutao.train.run.lineage import init_from_parent, load_run, merge_params

TINY = {"train.steps": 6, "train.log_every": 3, "train.eval_every": 0, "train.sample_every": 0,
        "train.checkpoint_every": 3, "train.batch_size": 4, "model.n_layers": 1, "model.d_model": 32,
        "model.n_heads": 2, "model.context_length": 16, "data.tokenizer": "char"}


def cfg_of(corpus, **extra):
    return apply_overrides(Config(), TINY | {"data.path": str(corpus)} | extra)


@pytest.fixture(scope="module")
def parent(small_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("parent") / "run"
    train(cfg_of(small_corpus), run, quiet=True)
    return run


def child_params(cfg, run_dir):
    p = prepare(cfg, run_dir)
    state = p.trainer.init_state()
    restored, lineage = init_from_parent(p.trainer.abstract_sharded_state()["params"], cfg.train.init_from,
                                         p.tokenizer.fingerprint)
    return p, merge_params(state["params"], restored), lineage


def test_a_child_reproduces_its_parents_logits_at_step_0(parent, small_corpus, tmp_path):
    cfg = cfg_of(small_corpus, **{"train.init_from": f"{parent}:3"})
    p, params, lineage = child_params(cfg, tmp_path / "child")
    assert lineage["step"] == 3 and lineage["fresh"] == [] and lineage["restored"] > 0
    tokens = np.asarray(p.batches.train(0)["tokens"][:2])
    want = np.asarray(forward_logits(load_run(parent, 3).model, tokens)[0])
    got = np.asarray(forward_logits(p.trainer.model(params), tokens)[0])
    np.testing.assert_array_equal(got, want)


def test_a_new_head_is_initialised_fresh_and_the_backbone_copied(parent, small_corpus, tmp_path):
    cfg = cfg_of(small_corpus, **{"train.init_from": str(parent), "model.tie_embeddings": False})
    p, params, lineage = child_params(cfg, tmp_path / "child")
    assert lineage["step"] == 6 and lineage["fresh"] == ["lm_head"]
    parent_params = load_run(parent).params
    np.testing.assert_array_equal(np.asarray(params["token_embed"]), np.asarray(parent_params["token_embed"]))
    fresh = p.trainer.init_state()["params"]["lm_head"]
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), np.asarray(fresh))  # the child's own init


def test_training_from_a_parent_records_the_lineage(parent, small_corpus, tmp_path):
    run = tmp_path / "child"
    summary = train(cfg_of(small_corpus, **{"train.init_from": str(parent), "train.steps": 3}), run, quiet=True)
    lineage = json.loads((run / "config.json").read_text())["lineage"]
    parent_cfg = json.loads((parent / "config.json").read_text())
    assert lineage["parent"] == str(parent.absolute()) and lineage["step"] == 6
    assert lineage["tokenizer_fingerprint"] == parent_cfg["provenance"]["tokenizer_fingerprint"]
    assert len(lineage["config_hash"]) == 16
    assert (run / "tokenizer").is_dir() and summary["step"] == 3
    # Its first loss is the parent's at the same parameters: far below a fresh model's.
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    fresh = train(cfg_of(small_corpus, **{"train.steps": 3}), tmp_path / "fresh", quiet=True)
    assert rows[0]["loss"] < fresh["train_loss"]


@pytest.mark.parametrize(("override", "message"), [
    ({"model.d_model": 64, "model.n_heads": 2}, r"the parent's .* is \(.*\) float32 but this model's is .*; the backbones differ"),
    ({"model.family": "lstm"}, "that run is a model.family=decoder model and this one model.family=lstm"),
    ({"data.tokenizer": "byte"}, r"was trained with data.tokenizer=char, but the config says byte"),
])
def test_a_backbone_that_does_not_fit_is_refused_in_one_line(parent, small_corpus, tmp_path, override, message):
    cfg = cfg_of(small_corpus, **{"train.init_from": str(parent)} | override)
    with pytest.raises(UserError, match=message) as e:
        train(cfg, tmp_path / "child", quiet=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "child" / "checkpoints").exists()


def test_a_parent_that_is_not_a_run_is_named(small_corpus, tmp_path):
    cfg = cfg_of(small_corpus, **{"train.init_from": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="does not exist"):
        train(cfg, tmp_path / "child", quiet=True)


@pytest.mark.parametrize("tied", [True, False])
def test_adding_the_tool_tokens_grows_the_vocabulary_and_keeps_the_parents_logits(parent, small_corpus, tmp_path,
                                                                                tied):
    from plutao.tokenizer import TOOL_TOKENS

    source = parent
    if not tied:  # (an untied parent: its head grows along its own vocabulary axis too)
        source = tmp_path / "untied"
        train(cfg_of(small_corpus, **{"model.tie_embeddings": False, "train.steps": 3}), source, quiet=True)
    cfg = cfg_of(small_corpus, **{"train.init_from": str(source), "data.add_specials": list(TOOL_TOKENS),
                                  "model.tie_embeddings": tied})
    p = prepare(cfg, tmp_path / "child")
    old_vocab = load_run(source).tokenizer.vocab_size
    assert p.tokenizer.has_tools and (p.tokenizer.call_id, p.tokenizer.tool_id) == (old_vocab, old_vocab + 1)
    assert p.cfg.model.vocab_size == old_vocab + 2 and p.grown_from["added"] == list(TOOL_TOKENS)
    restored, lineage = init_from_parent(p.trainer.abstract_sharded_state()["params"], cfg.train.init_from,
                                         p.tokenizer.fingerprint, p.cfg.model, grown_from=p.grown_from)
    assert lineage["grown"]["vocab"] == [old_vocab, old_vocab + 2] and lineage["fresh"] == []
    assert lineage["grown"]["parameters"] == (["token_embed"] if tied else ["lm_head", "token_embed"])
    params = merge_params(p.trainer.init_state()["params"], restored)
    embed, parent_embed = np.asarray(params["token_embed"]), np.asarray(load_run(source).params["token_embed"])
    np.testing.assert_array_equal(embed[:old_vocab], parent_embed)
    np.testing.assert_allclose(embed[old_vocab:], np.repeat(parent_embed.mean(0, keepdims=True), 2, 0), rtol=1e-6)
    tokens = np.asarray(p.batches.train(0)["tokens"][:2])  # (the parent's ids only)
    want = np.asarray(forward_logits(load_run(source).model, tokens)[0])
    got = np.asarray(forward_logits(p.trainer.model(params), tokens)[0])
    np.testing.assert_array_equal(got[..., :old_vocab], want)


def test_a_grown_run_grows_no_further_and_only_tool_tokens_may_be_added(parent, small_corpus, tmp_path):
    from plutao.tokenizer import TOOL_TOKENS
    from plutao.train.config.schema import validate

    grown = tmp_path / "grown"
    train(cfg_of(small_corpus, **{"train.init_from": str(parent), "data.add_specials": list(TOOL_TOKENS),
                                  "train.steps": 3}), grown, quiet=True)
    train(cfg_of(small_corpus, **{"train.init_from": str(parent), "data.add_specials": list(TOOL_TOKENS),
                                  "train.steps": 4}), grown, quiet=True)  # (resumed: the grown vocabulary fits)
    saved = json.loads((grown / "config.json").read_text())
    assert saved["lineage"]["grown"]["added"] == list(TOOL_TOKENS) and load_run(grown).step == 4
    again = prepare(cfg_of(small_corpus, **{"train.init_from": str(grown), "data.add_specials": list(TOOL_TOKENS)}),
                    tmp_path / "again")
    assert again.grown_from is None and again.cfg.model.vocab_size == saved["model"]["vocab_size"]
    with pytest.raises(UserError, match="data.add_specials may add only the tool tokens"):
        validate(cfg_of(small_corpus, **{"data.add_specials": ["<|foo|>"]}))
    with pytest.raises(UserError, match="which LoRA keeps frozen"):
        validate(cfg_of(small_corpus, **{"data.add_specials": list(TOOL_TOKENS), "lora.rank": 4}))
