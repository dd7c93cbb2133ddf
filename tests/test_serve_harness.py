"""lm-evaluation-harness's stock `local-completions` model against `plutao serve`: a small multiple-choice task
(YAML and JSONL written here, nothing downloaded) scores the same through the server as scoring each choice
directly with `plutao score`'s chain rule."""

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

DOCS = [{"q": "2+3=", "choices": ["5", "7"], "label": 0}, {"q": "4+4=", "choices": ["9", "8"], "label": 1},
        {"q": "1+6=", "choices": ["7", "3"], "label": 0}, {"q": "9-2=", "choices": ["6", "7"], "label": 1},
        {"q": "12+13=", "choices": ["25", "52"], "label": 0}]


@pytest.mark.slow  # (about a minute: torch, the harness and a server; fast sibling: test_serve.py's harness-shaped one)
def test_the_harness_scores_a_local_task_through_the_server_as_scoring_it_directly(tiny_stages, tmp_path):
    from lm_eval.tasks import TaskManager

    from plutao.train.eval.likelihood import score_text
    from plutao.train.run.lineage import load_run

    (tmp_path / "arith.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "arith.yaml").write_text(
        "task: plutao_arith\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'arith.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    from test_serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "plutao.experiments", "serve", str(tiny_stages["base"]), "--port",
                             str(port), "--slots", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        out = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"base_url={url}/v1/completions,model=base,tokenizer_backend=remote,"
            "tokenized_requests=True,num_concurrent=2,max_retries=1", tasks=["plutao_arith"],
            task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    finally:
        proc.terminate()
        proc.wait(30)
    run = load_run(tiny_stages["base"])
    got, right = [], []
    for sample in sorted(out["samples"]["plutao_arith"], key=lambda s: s["doc_id"]):
        doc = sample["doc"]
        direct = []
        for choice in doc["choices"]:
            per_token = score_text(run.trainer.graphdef, run.params, run.tokenizer, doc["q"] + choice,
                                   run.cfg.model.context_length)["per_token"]
            direct.append(sum(r["logprob"] for r in per_token[len(doc["q"]):]))
        np.testing.assert_allclose([r[0] for r in sample["filtered_resps"]], direct, atol=1e-4)
        got.append(sample["acc"])
        right.append(float(int(np.argmax(direct)) == doc["label"]))
    assert got == right and out["results"]["plutao_arith"]["acc,none"] == pytest.approx(np.mean(right))
