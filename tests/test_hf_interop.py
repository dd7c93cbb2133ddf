"""Hugging Face GPT-2 and Llama checkpoints in and out: logits equal PyTorch transformers' (the
reference), greedy generation gives its tokens, exported runs load with from_pretrained, sharded and
single files import alike, the hf tokenizer gives transformers' ids, and bad checkpoints are one line."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from plutao.experiments.cli import main
from plutao.model.decode import generate
from plutao.model.heads import forward_logits
from plutao.model.sampling import SamplingConfig
from plutao.train.run.lineage import load_run

pytest.importorskip("transformers")
pytest.importorskip("torch")
import hf_models

PROMPTS = ["Olá, mundo! café", "def add(a, b):\n    return", "The quick brown fox 🙂"]


def batch(tok, texts):
    """Right-padded ids and the mask of real tokens."""
    rows = [tok.encode(t) for t in texts]
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def our_logits(run, ids):
    logits, _ = forward_logits(run.model, jnp.asarray(ids, jnp.int32))
    return np.asarray(logits)


def imported(tmp_path, source, name="run"):
    assert main(["import-hf", str(source), "--workdir", str(tmp_path / name)]) == 0
    return load_run(tmp_path / name)


LLAMAS = {  # n_kv_heads ∈ {1, 2, n_heads}; tied and untied; θ ≠ 10000; biases on and off; llama3 scaling
    "mqa-untied": {"n_kv": 1, "tie": False, "theta": 50000.0},
    "gqa-tied-bias": {"n_kv": 2, "tie": True, "theta": 20000.0, "bias": True},
    "mha-llama3": {"n_kv": 4, "tie": False, "theta": 500000.0,
                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}


# (two cases in the slow set: their settings are each covered by a default case too — untied heads by
# mqa-untied, llama3 scaling by tests/test_gqa.py's frequencies, GPT-2 by gpt2-tied)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("case", ["mqa-untied", "gqa-tied-bias", pytest.param("mha-llama3", marks=SLOW), "gpt2-tied",
                                  pytest.param("gpt2-untied", marks=SLOW)])
def test_imported_logits_equal_transformers_and_export_round_trips(tmp_path, case):
    source = (hf_models.gpt2(tmp_path / "hf", tie=case == "gpt2-tied") if case.startswith("gpt2")
              else hf_models.llama(tmp_path / "hf", **LLAMAS[case]))
    run = imported(tmp_path, source)
    ids, mask = batch(run.tokenizer, PROMPTS)
    want = hf_models.hf_logits(source, ids, mask)
    ours = our_logits(run, ids)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], want[real], atol=1e-4, rtol=0)

    # Greedy generation: the same tokens as transformers' generate.
    import torch
    from transformers import AutoModelForCausalLM

    prompt = run.tokenizer.encode(PROMPTS[0])
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=run.tokenizer.eot_id)
    greedy = generate(run.model, [prompt], SamplingConfig(temperature=0.0, max_new_tokens=12, stop_at_eot=False),
                      eot_id=run.tokenizer.eot_id, pad_id=run.tokenizer.pad_id)[0]
    assert greedy == out[0, len(prompt):].tolist()

    # Exported back: from_pretrained loads it, and its logits are ours.
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    again = hf_models.hf_logits(tmp_path / "out", ids, mask)
    np.testing.assert_allclose(again[real], ours[real], atol=1e-5, rtol=0)


def test_sharded_checkpoint_imports_like_a_single_file(tmp_path):
    single = hf_models.llama(tmp_path / "single", seed=3)
    sharded = hf_models.llama(tmp_path / "sharded", seed=3, shards="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    a, b = imported(tmp_path, single, "a"), imported(tmp_path, sharded, "b")
    ids, _ = batch(a.tokenizer, PROMPTS[:1])
    np.testing.assert_array_equal(our_logits(a, ids), our_logits(b, ids))


def test_long_text_ids_equal_transformers(tmp_path):
    from transformers import AutoTokenizer

    source = hf_models.llama(tmp_path / "hf")
    run = imported(tmp_path, source)
    text = "".join(f"{i} {hf_models.TEXT}" + "\n" * (i % 4) for i in range(700))  # (> 64K characters, blank lines)
    assert len(text) > 1 << 16
    want = AutoTokenizer.from_pretrained(source)(text, add_special_tokens=False)["input_ids"]
    assert run.tokenizer.encode_array(text).tolist() == want


def test_scanned_layers_export_as_their_blocks(tmp_path):
    """A run with model.scan_layers=true (stacked weights) exports block by block."""
    from flax import nnx

    from plutao.model.config import ModelConfig
    from plutao.model.gpt import GPT
    from plutao.tokenizer import ByteTokenizer
    from plutao.train.config.schema import Config
    from plutao.train.interop.hf_run import export_hf

    cfg = ModelConfig(vocab_size=267, context_length=32, n_layers=3, d_model=32, n_heads=4, scan_layers=True,
                      norm_type="rmsnorm", positions="rotary", activation="swiglu").resolved()
    model = GPT(cfg, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    class Run:
        tokenizer = ByteTokenizer()

        def __init__(self):
            self.cfg = Config(model=cfg)

        def param(self, path):
            node = params
            for k in path:
                node = node[k]
            return np.asarray(node)

        def param_shape(self, path):
            return self.param(path).shape

    export_hf(Run(), tmp_path / "out")
    ids = np.random.default_rng(0).integers(0, 267, (2, 16))
    np.testing.assert_allclose(hf_models.hf_logits(tmp_path / "out", ids), our_logits(type("R", (), {"model": model}),
                               ids), atol=1e-5, rtol=0)


def test_a_bfloat16_checkpoint_imports_as_its_float32_values(tmp_path):
    source = hf_models.llama(tmp_path / "hf", bf16=True)
    assert '"BF16"' in (source / "model.safetensors").read_bytes()[:20000].decode("latin-1")
    run = imported(tmp_path, source)
    ids, mask = batch(run.tokenizer, PROMPTS)
    real = mask.astype(bool)
    np.testing.assert_allclose(our_logits(run, ids)[real], hf_models.hf_logits(source, ids, mask)[real], atol=1e-4,
                               rtol=0)


def test_hf_tokenizer_ids_equal_transformers(tmp_path):
    from transformers import AutoTokenizer

    source = hf_models.llama(tmp_path / "hf", chat="roles")
    run = imported(tmp_path, source)
    reference = AutoTokenizer.from_pretrained(source)
    text = "Tradução: não, obrigado! 🙂🚀 <tag>\n\tfor x in range(10): print(x ** 2)  # 数字 ünïcödé"
    assert run.tokenizer.kind == "hf"
    assert run.tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
    assert run.tokenizer.decode(run.tokenizer.encode(text)) == text


def test_chat_template_roles_map_and_export_renders_ours(tmp_path):
    from transformers import AutoTokenizer

    from plutao.tokenizer.chat import render

    run = imported(tmp_path, hf_models.llama(tmp_path / "hf", chat="roles"))
    tok = run.tokenizer
    assert {r: tok.special_tokens.roles[r] for r in ("user", "assistant", "end", "system")} == {
        "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>", "system": "<|system|>"}
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Olá?"},
                {"role": "assistant", "content": "Oi! 🙂"}]
    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = exported.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(ids) == render(messages, tok).ids.tolist()


def test_a_text_role_template_keeps_plain_prompting(tmp_path, capsys):
    source = hf_models.llama(tmp_path / "hf", chat="chatml")
    assert main(["import-hf", str(source), "--workdir", str(tmp_path / "run")]) == 0
    assert "writes roles as text" in capsys.readouterr().out
    assert not load_run(tmp_path / "run").tokenizer.has_special("user")


def refused(tmp_path, capsys, source, needle):
    capsys.readouterr()  # (what building the fixture printed)
    code = main(["import-hf", str(source), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.partial-*"))


def test_bad_checkpoints_are_one_line_and_write_nothing(tmp_path, capsys):
    source = hf_models.llama(tmp_path / "hf")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(tmp_path, capsys, empty, "has no config.json")

    config = json.loads((source / "config.json").read_text())
    other = tmp_path / "mistral"
    shutil.copytree(source, other)
    (other / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForCausalLM"]}))
    refused(tmp_path, capsys, other, "MistralForCausalLM is not supported")

    gpt2 = hf_models.gpt2(tmp_path / "gpt2")
    gpt2_config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(gpt2_config | {"scale_attn_by_inverse_layer_idx": True}))
    refused(tmp_path, capsys, gpt2, "scale_attn_by_inverse_layer_idx=True (per-layer attention scaling) is not supported")

    (other / "config.json").write_text(json.dumps(config | {"num_local_experts": 8}))
    refused(tmp_path, capsys, other, "mixture of experts")

    (other / "config.json").write_text(json.dumps(config | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                              "rope_theta": 1e4}}))
    refused(tmp_path, capsys, other, "rope scaling type 'yarn' is not supported")

    (other / "config.json").write_text(json.dumps(config | {"intermediate_size": 128}))
    refused(tmp_path, capsys, other, "the weights and the config do not belong together")

    (other / "config.json").write_text(json.dumps(config))
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    refused(tmp_path, capsys, other, "is truncated")


def test_export_refuses_a_layout_transformers_has_not(tmp_path, capsys):
    run = imported(tmp_path, hf_models.llama(tmp_path / "hf"))
    capsys.readouterr()
    config = json.loads((run.run_dir / "config.json").read_text())
    config["model"]["activation"] = "gelu"  # rotary + RMSNorm + GELU: neither GPT-2 nor Llama
    (run.run_dir / "config.json").write_text(json.dumps(config))
    code = main(["export-hf", str(run.run_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "matches neither GPT-2's layout" in err and not (tmp_path / "out").exists(), err


def test_imported_llama_fine_tuned_with_lora_exports_its_fine_tuned_logits(tmp_path):
    source = hf_models.llama(tmp_path / "hf", chat="roles")
    base = imported(tmp_path, source, "base")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Quanto é {a}+{b}?"},
                                                      {"role": "assistant", "content": f"{a + b} 🙂"}]}) + "\n"
                             for a in range(8) for b in range(4)))
    assert main(["sft", str(tmp_path / "base"), "--workdir", str(tmp_path / "sft"), "--data", str(chats),
                 "lora.rank=4", "lora.targets=[attention,mlp]", "train.steps=3", "train.batch_size=4",
                 "optim.lr=3e-2", "--quiet"]) == 0
    assert main(["merge-lora", str(tmp_path / "sft"), "--workdir", str(tmp_path / "merged")]) == 0
    assert main(["export-hf", str(tmp_path / "merged"), "--out", str(tmp_path / "out")]) == 0
    merged = load_run(tmp_path / "merged")
    ids, mask = batch(merged.tokenizer, PROMPTS)
    tuned, real = our_logits(merged, ids), mask.astype(bool)
    assert np.abs(tuned - our_logits(base, ids))[real].max() > 1e-2  # (the fine-tuning moved it)
    np.testing.assert_allclose(hf_models.hf_logits(tmp_path / "out", ids, mask)[real], tuned[real], atol=1e-5, rtol=0)


def test_a_plutao_chat_run_runs_in_transformers(tiny_stages, tmp_path):
    """A run trained here (char tokenizer, learned positions, no biases) exports as GPT-2: transformers'
    logits are ours, its tokenizer gives our ids, its chat template renders our layout."""
    from transformers import AutoTokenizer

    from plutao.tokenizer.chat import render

    run = load_run(tiny_stages["sft"])
    assert main(["export-hf", str(tiny_stages["sft"]), "--out", str(tmp_path / "out")]) == 0
    reference = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]
    ids = render(messages, run.tokenizer).ids.tolist()
    assert list(reference.apply_chat_template(messages, tokenize=True, return_dict=False)) == ids
    assert reference("12 plus 30", add_special_tokens=False)["input_ids"] == run.tokenizer.encode("12 plus 30")
    # (by default a text opens with <|endoftext|>, as plutao's documents and `plutao sample`'s prompts do)
    assert reference("12 plus 30")["input_ids"] == [run.tokenizer.eot_id, *run.tokenizer.encode("12 plus 30")]
    want = our_logits(run, np.asarray([ids]))
    np.testing.assert_allclose(hf_models.hf_logits(tmp_path / "out", np.asarray([ids])), want, atol=1e-5, rtol=0)


def test_byte_tokenizer_exports_with_equal_ids(tmp_path):
    from transformers import AutoTokenizer

    from plutao.tokenizer import ByteTokenizer
    from plutao.train.interop.hf_tokenizer import export_tokenizer

    tok = ByteTokenizer()
    export_tokenizer(tok, tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    text = "Olá, ünïcödé 🙂 <tag> \x00\t\n数字"
    assert reference(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert reference.decode(tok.encode(text)) == text


def test_sentencepiece_bpe_tokenizer_exports_with_equal_ids(tmp_path):
    """plutao's sentencepiece BPE as a `tokenizers` BPE: the same ids on text it was not trained on."""
    from transformers import AutoTokenizer

    from plutao.tokenizer import train_tokenizer
    from plutao.train.data.corpora import python_docstrings
    from plutao.train.interop.hf_tokenizer import export_tokenizer

    docs = python_docstrings()
    tok = train_tokenizer("bpe", ["\n\n".join(docs[:300])], vocab_size=800)
    export_tokenizer(tok, tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    texts = [*docs[300:400], hf_models.TEXT, "Tradução: não! 🙂 数字\n\n\tx  =   1  ", "   ", "a\n\nb "]
    for text in texts:
        assert reference(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text[:60]
    assert reference.decode(tok.encode(texts[-3])) == texts[-3]
