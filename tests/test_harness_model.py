"""lm-evaluation-harness on a plutao run: a local multiple-choice task's accuracy equals our own
scoring of the same choices, loglikelihood_rolling equals plutao's log-probability of the text, and
generate_until equals greedy sampling cut at the stop string."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
import hf_models
from lm_eval.api.instance import Instance

from plutao.experiments.cli import main
from plutao.experiments.harness import PlutaoLM
from plutao.model.decode import generate
from plutao.model.heads import forward_logits
from plutao.model.sampling import SamplingConfig

QUESTIONS = [("Olá, mundo!", ["café", "fox", "soma"], 0), ("def add(a, b):", ["return", "lazy", "🙂"], 2),
             ("The quick brown", ["fox", "dog", "12345"], 1), ("Não há ação", ["sem", "def", "jumps"], 0),
             ("12345 + 678 =", ["13023", "brûlée", "mundo"], 0)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    assert main(["import-hf", str(hf_models.llama(tmp / "hf", seed=5)), "--workdir", str(tmp / "run")]) == 0
    return tmp / "run"


def logprobs(lm, pairs: list[tuple[str, str]]) -> list[float]:
    """Σ log P(continuation tokens | context) for each pair: our own, written out here (one forward pass
    over the pairs right-padded into a batch; causal, so the padding changes nothing before it)."""
    rows = [(lm.tok.encode(c), lm.tok.encode(c + x)) for c, x in pairs]
    T = max(len(w) for _, w in rows)
    tokens = np.zeros((len(rows), T), np.int32)
    for i, (_, whole) in enumerate(rows):
        tokens[i, :len(whole)] = whole
    logits, _ = forward_logits(lm.run.model, jnp.asarray(tokens[:, :-1]))
    logp = np.asarray(logits, np.float64)
    logp = logp - logp.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return [sum(logp[i, t - 1, whole[t]] for t in range(len(ctx), len(whole))) for i, (ctx, whole) in enumerate(rows)]


def local_task(tmp_path) -> None:
    """A multiple-choice task over a JSONL file: task YAML in `tmp_path`, nothing downloaded."""
    data = tmp_path / "choices.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
                            for q, c, a in QUESTIONS))
    (tmp_path / "plutao_choices.yaml").write_text(
        "task: plutao_choices\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")


def our_accuracy(lm) -> float:
    return float(np.mean([int(np.argmax(logprobs(lm, [(q, " " + c) for c in cs]))) == a for q, cs, a in QUESTIONS]))


@pytest.mark.slow  # (lm_eval indexes its ~14,000 built-in tasks first: 50 s; the tests below are its fast siblings)
def test_plutao_eval_harness_on_a_local_task(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    local_task(tmp_path)
    out = subprocess.run([sys.executable, "-m", "plutao.experiments.cli", "eval", str(run_dir), "--harness",
                          "plutao_choices", "--include-path", str(tmp_path), "--json"],
                         check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    acc = json.loads(out.stdout.strip().splitlines()[-1])["results"]["plutao_choices"]["acc,none"]
    assert acc == pytest.approx(our_accuracy(PlutaoLM(str(run_dir))))


# (slow: lm_eval's evaluation of a local task in process, 20 s; its fast sibling is the request-by-request
# test below, and the whole path as a process is the slow test above)
@pytest.mark.slow
def test_multiple_choice_accuracy_equals_our_scoring(run_dir, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from plutao.experiments.harness import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    local_task(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    acc = evaluate(str(run_dir), ["plutao_choices"], task_manager=manager)["results"]["plutao_choices"]["acc,none"]
    assert acc == pytest.approx(our_accuracy(PlutaoLM(str(run_dir))))


def test_loglikelihood_requests_equal_the_one_row_computation(run_dir):
    """lm_eval's multiple-choice requests through the batched pass equal the one-row computation."""
    lm = PlutaoLM(str(run_dir))
    requests = [Instance("loglikelihood", {}, (q, " " + c), 0) for q, cs, _ in QUESTIONS for c in cs]
    got = [lp for lp, _ in lm.loglikelihood(requests)]
    want = logprobs(lm, [(q, " " + c) for q, cs, _ in QUESTIONS for c in cs])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rolling_loglikelihood_equals_plutao_score_and_its_windows(run_dir, capsys):
    lm = PlutaoLM(str(run_dir))
    short = "Olá, mundo! Não há ação sem reação."
    capsys.readouterr()
    assert main(["score", str(run_dir), "--text", short, "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["logprob"]
    [rolled] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)])
    assert rolled == pytest.approx(scored, abs=1e-3)
    # Longer than the context (64): windows of 64 predictions, each from the tokens before it in its window.
    long = " ".join([hf_models.TEXT] * 3)
    ids = [lm.tok.eot_id, *lm.tok.encode(long)]
    assert len(ids) > 2 * 64
    total = 0.0
    for lo in range(0, len(ids) - 1, 64):
        window = ids[lo:lo + 65]
        logits, _ = forward_logits(lm.run.model, jnp.asarray([window[:-1]], jnp.int32))
        logp = np.asarray(logits[0], np.float64)
        lse = np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1)) + logp.max(-1)
        total += sum(logp[t, window[t + 1]] - lse[t] for t in range(len(window) - 1))
    [rolled] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)])
    assert rolled == pytest.approx(total, abs=1e-2) and math.isfinite(rolled)


def test_generate_until_is_greedy_sampling_cut_at_the_stop(run_dir):
    lm = PlutaoLM(str(run_dir))
    context = "The quick brown"
    banned = lm.tok.unsampled_ids(vocab_size=lm.run.cfg.model.vocab_size)
    greedy = generate(lm.run.model, [lm.tok.encode(context)],
                      SamplingConfig(temperature=0.0, max_new_tokens=12, banned_ids=banned),
                      eot_id=lm.tok.eot_id, pad_id=lm.tok.pad_id)[0]
    text = lm.tok.decode(greedy, skip_special=True)
    stop = text[3:5] if len(text) > 5 else "\n"
    [got] = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0)])
    assert got == text[:text.index(stop)] if stop in text else got == text
