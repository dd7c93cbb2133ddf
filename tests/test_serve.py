"""`plutao serve` as a real process on loopback, reached with the official `openai` client and plain HTTP:
models, completions, chat, streaming equal to the whole reply, n, seeds, stop strings, usage equal to the
tokenizer's counts, log-probs equal to `plutao score`'s, 48 concurrent requests each equal to its solo
result, rewards, tokenization, every refusal in OpenAI's error shape, and SIGTERM exiting 0."""

import concurrent.futures
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_stages):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "plutao.experiments", "serve", str(tiny_stages["sft"]),
                             str(tiny_stages["base"]), str(tiny_stages["rm"]), "--port", str(port), "--slots", "8",
                             "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail("the server did not become ready in 180 s")
    yield {"url": url, "proc": proc, "runs": tiny_stages}
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def tok(server):
    from plutao.tokenizer import load_tokenizer

    return load_tokenizer(server["runs"]["base"] / "tokenizer")


CHAT = [{"role": "user", "content": "What is 3+4?"}]


def test_models_completions_and_chat_through_the_official_client(client, tok):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"sft", "base", "rm"}
    c = client.completions.create(model="base", prompt="1+1=", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length") and isinstance(c.choices[0].text, str)
    assert c.usage.prompt_tokens == len(tok.encode("1+1=")) and c.usage.completion_tokens == len(tok.encode(c.choices[0].text))
    r = client.chat.completions.create(model="sft", messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(tok.encode(r.choices[0].message.content))
    for seed in range(4):  # (a base run chatting often stops at <|endoftext|>: never part of the reply's text)
        b = client.chat.completions.create(model="base", messages=CHAT, max_tokens=12, temperature=1.0, seed=seed)
        assert "<|endoftext|>" not in b.choices[0].message.content


def test_a_streamed_reply_reassembles_to_the_whole_one_and_reports_usage_only_when_asked(client):
    whole = client.chat.completions.create(model="sft", messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="sft", messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    plain = list(client.completions.create(model="base", prompt="2+2=", max_tokens=6, temperature=0, stream=True))
    done = client.completions.create(model="base", prompt="2+2=", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in plain) == done.choices[0].text
    assert all(getattr(c, "usage", None) is None for c in plain)


def test_n_choices_and_seeds_are_reproducible(client):
    a = client.completions.create(model="base", prompt="5+", max_tokens=8, temperature=1.0, n=3, seed=11)
    b = client.completions.create(model="base", prompt="5+", max_tokens=8, temperature=1.0, n=3, seed=11)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    other = client.completions.create(model="base", prompt="5+", max_tokens=8, temperature=1.0, n=3, seed=12)
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_a_stop_string_ends_the_reply_before_it(client):
    full = client.completions.create(model="base", prompt="1", max_tokens=12, temperature=0).choices[0].text
    assert len(full) >= 3, full
    stop = full[2]
    cut = client.completions.create(model="base", prompt="1", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_and_echo_equal_plutao_scores_per_token_logprobs(client, server, tok):
    from plutao.train.eval.likelihood import score_text
    from plutao.train.run.lineage import load_run

    run = load_run(server["runs"]["base"])
    c = client.completions.create(model="base", prompt="12+13=25", max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = c.choices[0].logprobs
    text = c.choices[0].text
    ended = c.choices[0].finish_reason == "stop"  # (then the <|endoftext|> it stopped on is listed last)
    assert text.startswith("12+13=25") and "".join(lp.tokens) == text + ("<|endoftext|>" if ended else "")
    want = score_text(run.trainer.graphdef, run.params, run.tokenizer, text, run.cfg.model.context_length)
    n = len(want["per_token"])
    np.testing.assert_allclose(lp.token_logprobs[:n], [r["logprob"] for r in want["per_token"]], atol=1e-4)
    for row, got in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(row) == 2 and max(row.values()) >= got - 1e-6  # (the likeliest two, at least as likely)
    chat = client.chat.completions.create(model="sft", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_what_the_harness_reads_equals_scoring_directly(server, client):
    """What lm-evaluation-harness's local-completions does (its slow test runs the harness itself): the
    remote tokenizer's routes, then a context + continuation sent as token ids with echo and logprobs,
    the continuation's log-likelihood read as token_logprobs[len(context):-1]."""
    from plutao.train.eval.likelihood import score_text
    from plutao.train.run.lineage import load_run

    info = httpx.get(server["url"] + "/tokenizer_info?model=base", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|endoftext|>" and info["max_model_len"] == 32
    context = post(server, "/tokenize", {"model": "base", "prompt": "12+13=", "add_special_tokens": False}).json()["tokens"]
    continuation = post(server, "/tokenize", {"model": "base", "prompt": "25"}).json()["tokens"]
    out = client.completions.create(model="base", prompt=context + continuation, max_tokens=1, temperature=0, echo=True,
                                    logprobs=1, seed=1234)
    got = sum(out.choices[0].logprobs.token_logprobs[len(context):-1])
    run = load_run(server["runs"]["base"])
    per_token = score_text(run.trainer.graphdef, run.params, run.tokenizer, "12+13=25", 32)["per_token"]
    assert got == pytest.approx(sum(r["logprob"] for r in per_token[len(context):]), abs=1e-4)


def test_48_concurrent_requests_each_equal_their_solo_result(client):
    rng = np.random.default_rng(0)
    asks = [{"model": "base", "prompt": str(int(rng.integers(1, 999))) + "+", "max_tokens": int(rng.integers(2, 12)),
                 "temperature": float(rng.choice([0.0, 1.0, 0.7])), "top_p": float(rng.choice([1.0, 0.9])),
                 "seed": int(rng.integers(100)), "extra_body": {"top_k": int(rng.choice([0, 5]))}} for _ in range(48)]

    def ask(kw):
        return client.completions.create(**kw).choices[0].text

    alone = [ask(kw) for kw in asks]
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        together = list(pool.map(ask, asks))
    assert together == alone


def test_rewards_and_tokenization(server, tok):
    from plutao.train.rl.rewards import RewardScorer

    convo = CHAT + [{"role": "assistant", "content": "7"}]
    r = post(server, "/v1/rewards", {"model": "rm", "messages": convo})
    assert r.status_code == 200
    want = float(RewardScorer.load(server["runs"]["rm"]).score([convo])[0])
    assert abs(r.json()["score"] - want) < 1e-4
    t = post(server, "/tokenize", {"model": "base", "prompt": "12+7"}).json()
    assert t["tokens"] == tok.encode("12+7") and t["count"] == 4
    assert post(server, "/detokenize", {"model": "base", "tokens": t["tokens"]}).json()["prompt"] == "12+7"


@pytest.mark.parametrize("path, body, key, status, said", [
    ("/v1/completions", {"model": "base", "prompt": "1" * 30, "max_tokens": 10}, KEY, 400,
     "the prompt is 30 tokens (31 with the <|endoftext|> it starts from) and max_tokens is 10: 41 is more than"),
    ("/v1/completions", {"model": "base", "prompt": "1", "temperature": -1}, KEY, 400, "temperature"),
    ("/v1/completions", {"model": "nope", "prompt": "1"}, KEY, 404, "model 'nope' is not served here"),
    ("/v1/completions", {"model": "base", "prompt": "1"}, "wrong", 401, "API key"),
    ("/v1/models", None, None, 401, "API key"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "wizard", "content": "hi"}]}, KEY, 400, "role"),
    ("/v1/completions", {"model": "rm", "prompt": "1"}, KEY, 400, "is a reward model"),
    ("/v1/rewards", {"model": "base", "messages": CHAT}, KEY, 400, "not a reward model"),
    ("/detokenize", {"model": "base", "tokens": [10 ** 6]}, KEY, 400, "not in the vocabulary"),
])
def test_refusals_have_their_status_and_openais_error_shape_and_the_next_request_is_answered(
        server, client, path, body, key, status, said):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = (httpx.post(server["url"] + path, json=body, headers=headers, timeout=30) if body is not None
         else httpx.get(server["url"] + path, headers=headers, timeout=30))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert said in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.completions.create(model="base", prompt="1+", max_tokens=2, temperature=0).choices[0].text is not None


def test_malformed_json_is_a_400_and_health_needs_no_key(server):
    r = httpx.post(server["url"] + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    assert "plutao_slots_in_use" in httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text


def test_the_page_is_served_with_its_test_hooks(server):
    page = httpx.get(server["url"] + "/").text
    assert 'data-testid="message"' in page and "http" not in page.split("<script>")[1].split("fetch(")[0]


def test_the_terminal_chat_talks_to_the_server(server, client):
    want = client.chat.completions.create(model="sft", messages=CHAT, max_tokens=8, temperature=0, seed=0)
    out = subprocess.run([sys.executable, "-m", "plutao.experiments", "chat", "--url", server["url"], "--model", "sft",
                          "--api-key", KEY, "--temperature", "0", "--max-new-tokens", "8"], check=False, input="What is 3+4?\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"sft> {want.choices[0].message.content}".replace("\n", "\\n") in out.stdout
    wrong = subprocess.run([sys.executable, "-m", "plutao.experiments", "chat", "--url", server["url"], "--model", "nope",
                            "--api-key", KEY], check=False, input="", capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "--model 'nope'" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


def browser():
    """Headless Chromium through Selenium (Debian's chromium and chromium-driver), or a skip that says why."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium and chromedriver here (apt install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_web_chat_streams_an_answer_and_compares_the_runs_in_a_real_browser(server, client, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    want = {m: client.chat.completions.create(model=m, messages=[{"role": "user", "content": "3+4?"}], max_tokens=8,
                                              temperature=0).choices[0].message.content for m in ("sft", "base")}
    driver = browser()
    try:
        driver.get(server["url"] + "/")
        driver.execute_script(f"localStorage.setItem('plutao-key', '{KEY}')")  # (as a user's earlier visit left it)
        driver.refresh()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="pick-base"]'))
        driver.find_element(By.CSS_SELECTOR, '[data-testid="pick-base"]').click()  # (sft is ticked already)
        driver.find_element(By.CSS_SELECTOR, '[data-testid="max-tokens"]').send_keys("8")
        driver.find_element(By.CSS_SELECTOR, '[data-testid="message"]').send_keys("3+4?")
        driver.find_element(By.CSS_SELECTOR, '[data-testid="send"]').click()

        def answers(d):
            got = {m: d.find_elements(By.CSS_SELECTOR, f'[data-testid="column-{m}"] [data-testid="answer"]')
                   for m in want}
            return got if all(a and a[-1].get_attribute("data-state") == "done" for a in got.values()) else None

        try:
            got = wait.until(answers)
        except TimeoutException:
            raise AssertionError(driver.find_element(By.ID, "columns").get_attribute("innerHTML")) from None
        assert {m: a[-1].get_attribute("textContent") for m, a in got.items()} == want
        driver.save_screenshot(str(tmp_path / "web-chat.png"))
        assert (tmp_path / "web-chat.png").stat().st_size > 0
    finally:
        driver.quit()


def test_sigterm_lets_a_running_request_finish_and_exits_0(server, client):
    proc = server["proc"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.completions.create, model="base", prompt="1", max_tokens=20, temperature=0)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert running.result(timeout=30).choices[0].finish_reason in ("stop", "length")
    assert proc.wait(timeout=30) == 0


def test_serve_refuses_bad_arguments_in_one_line_before_loading(tiny_stages, tmp_path, capsys):
    from plutao.experiments.cli import main

    for argv, said in (([str(tmp_path / "missing")], "missing"), ([str(tiny_stages["sft"]), "--slots", "0"],
                                                                  "--slots must be ≥ 1")):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
