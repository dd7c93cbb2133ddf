"""The serving engine's scheduler with a hand-computable fake model behind the real thread and queues:
every request gets the tokens it would get alone, whatever it is batched with; a slot is freed at once
when its request stops, is cancelled or times out; a full queue refuses; one request's failure never
reaches another; admitting fills one request alone or a group padded to 8; a stop lets running requests finish."""

import threading
import time

import numpy as np
import pytest

from plutao.model import engine as eng
from plutao.model.sampling import SamplingConfig

EOT = 0
V = 97


def solo(prompt, s: SamplingConfig, answer=None, pause=-1) -> list[int]:
    """The fake model alone: each token is (the one before it + seed + 1) mod V, until a stop id (kept) or
    max_new_tokens; with `answer`, the pause token is followed by answer's tokens (not counted)."""
    out, last, n = [], prompt[-1], 0
    while n < s.max_new_tokens:
        last = (last + s.seed + 1) % V
        out.append(last)
        n += 1
        if last == pause and answer is not None and n < s.max_new_tokens:
            forced = answer(0, out, 0)
            out += forced
            last = forced[-1]
        elif last in Fake.stop_ids(s):
            break
    return out


class Fake:
    """Slots of the fake model, as DecoderBackend offers them to the scheduler."""

    context = 10 ** 6

    def __init__(self, n_slots):
        self.n_slots = n_slots
        self.rows = [None] * n_slots  # [last token, sampling, produced, active]
        self.fills, self.steps, self.lock = [], 0, threading.Lock()

    @staticmethod
    def stop_ids(s):
        return tuple(s.stop_ids) + ((EOT,) if s.stop_at_eot else ())

    def _next(self, b):
        last, s, n, _ = self.rows[b]
        t = (last + s.seed + 1) % V
        self.rows[b][0], self.rows[b][2] = t, n + 1
        self.rows[b][3] = not (t in self.stop_ids(s) or n + 1 >= s.max_new_tokens)
        return t

    def fill(self, slot_ids, prompts, samplings):
        self.fills.append(eng.padded_count(len(slot_ids)))
        out = []
        for b, p, s in zip(slot_ids, prompts, samplings):
            self.rows[b] = [p[-1], s, 0, True]
            out.append(self._next(b))
        return np.array(out), -np.array(out) / 100.0, np.array([self.rows[b][3] for b in slot_ids])

    def run(self, steps):
        self.steps += 1
        B = self.n_slots
        tokens, valid = np.zeros((B, steps), int), np.zeros((B, steps), bool)
        for b in range(B):
            for k in range(steps):
                if self.rows[b] is not None and self.rows[b][3]:
                    tokens[b, k], valid[b, k] = self._next(b), True
        active = np.array([r is not None and r[3] for r in self.rows])
        return tokens, -tokens / 100.0, valid, active

    def extend(self, slot_ids, forced):
        out = []
        for b, f in zip(slot_ids, forced):
            self.rows[b][0], self.rows[b][3] = f[-1], True
            out.append(self._next(b))
        return np.array(out), -np.array(out) / 100.0, np.array([self.rows[b][3] for b in slot_ids])

    def release(self, slot_ids):
        for b in slot_ids:
            if self.rows[b] is not None:
                self.rows[b][3] = False


class Collect:
    def __init__(self):
        self.tokens, self.finish, self.done = [], None, threading.Event()

    def __call__(self, ev: eng.Event):
        self.tokens += ev.tokens
        if ev.finish:
            self.finish = ev.finish
            self.done.set()


@pytest.fixture
def running():
    engines = []

    def start(n_slots=4, **kw):
        fake = Fake(n_slots)
        e = eng.Engine({"m": fake}, **kw)
        e.start()
        engines.append(e)
        return e, fake

    yield start
    for e in engines:
        e.stop(1.0)


def submit(e, prompt, s, **kw):
    c = Collect()
    r = eng.Request("m", prompt, s, c, **kw)
    e.submit(r)
    return r, c


def test_every_request_gets_its_solo_tokens_however_it_is_batched(running):
    e, fake = running(n_slots=4, chunk=3)
    rng = np.random.default_rng(0)
    cases = [([int(rng.integers(1, V))], SamplingConfig(max_new_tokens=int(rng.integers(1, 12)), seed=int(rng.integers(9)),
                                                        stop_ids=(int(rng.integers(1, V)),))) for _ in range(30)]
    got = [submit(e, p, s) for p, s in cases]  # (30 requests, 4 slots: most wait)
    for (p, s), (_, c) in zip(cases, got):
        assert c.done.wait(5)
        assert c.tokens == solo(p, s)
        assert c.finish == ("stop" if c.tokens[-1] in Fake.stop_ids(s) else "length")
    assert set(fake.fills) <= {1, 8} and e.slots_in_use() == 0 and e.queue_depth() == 0


def test_a_cancelled_request_frees_its_slot_at_once_and_the_next_one_takes_it(running):
    e, _fake = running(n_slots=1, chunk=1)
    long = SamplingConfig(max_new_tokens=10 ** 6, stop_at_eot=False)
    r, c = submit(e, [5], long)
    _waiting_r, waiting = submit(e, [7], SamplingConfig(max_new_tokens=3))
    time.sleep(0.05)
    assert e.slots_in_use() == 1 and not waiting.done.is_set()
    e.cancel(r)
    assert waiting.done.wait(2) and waiting.tokens == solo([7], SamplingConfig(max_new_tokens=3))
    deadline = time.monotonic() + 1
    while e.slots_in_use() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert e.slots_in_use() == 0 and c.finish is None  # (a cancelled request hears nothing more)


def test_a_request_past_its_timeout_ends_and_frees_its_slot(running):
    e, _ = running(n_slots=1, chunk=1)
    _r, c = submit(e, [5], SamplingConfig(max_new_tokens=10 ** 6, stop_at_eot=False), timeout=0.1)
    assert c.done.wait(2) and c.finish == "timeout"
    _after, d = submit(e, [3], SamplingConfig(max_new_tokens=2))
    assert d.done.wait(2) and d.tokens == solo([3], SamplingConfig(max_new_tokens=2))


def test_a_full_queue_refuses_and_a_stopping_engine_admits_nothing(running):
    e, _ = running(n_slots=1, max_queue=2, chunk=1)
    long = SamplingConfig(max_new_tokens=10 ** 6, stop_at_eot=False)
    first = submit(e, [1], long)
    time.sleep(0.05)  # (the first takes the slot; two more may wait)
    submit(e, [1], long), submit(e, [1], long)
    with pytest.raises(eng.QueueFull):
        submit(e, [1], long)
    assert not e.stop(0.1)  # (they never finish: cancelled at the end of the grace period)
    with pytest.raises(eng.Stopping):
        submit(e, [1], long)
    assert first[0].cancelled


def test_a_failing_callback_ends_only_its_own_request(running):
    e, _ = running(n_slots=2, chunk=2)

    def boom(ev):
        raise RuntimeError("client bug")

    bad = eng.Request("m", [4], SamplingConfig(max_new_tokens=50), boom)
    e.submit(bad)
    s = SamplingConfig(max_new_tokens=20)
    _, good = submit(e, [9], s)
    assert good.done.wait(2) and good.tokens == solo([9], s)
    assert bad.cancelled


def test_stop_lets_running_requests_finish_within_the_grace_period(running):
    e, _ = running(n_slots=2, chunk=1)
    s = SamplingConfig(max_new_tokens=30)
    _, c = submit(e, [2], s)
    assert e.stop(2.0) and c.finish == "length" and c.tokens == solo([2], s)


def test_a_tool_call_pauses_the_row_writes_the_result_into_its_slot_and_the_row_goes_on(running):
    e, _ = running(n_slots=3, chunk=2)
    pause = 12

    def answer(row, reply, calls):
        return [50 + calls, 60]

    s = SamplingConfig(max_new_tokens=20, stop_ids=(pause,), stop_at_eot=False)
    c = Collect()
    forced = []
    r = eng.Request("m", [5], s, lambda ev: (forced.append(ev.tokens) if ev.forced else None, c(ev)), answer=answer,
                    pause_id=pause, max_calls=4)
    e.submit(r)
    _, other = submit(e, [30], SamplingConfig(max_new_tokens=15, stop_at_eot=False))  # (decodes beside it)
    assert c.done.wait(2) and other.done.wait(2)
    assert c.tokens == solo([5], s, answer, pause) and forced == [[50, 60]]
    assert c.finish == "length" and other.tokens == solo([30], SamplingConfig(max_new_tokens=15, stop_at_eot=False))


def test_fill_groups_and_padded_counts():
    assert eng.fill_groups(0) == [] and eng.fill_groups(3) == [3] and eng.fill_groups(19) == [8, 8, 3]
    assert [eng.padded_count(n) for n in range(1, 9)] == [1, 8, 8, 8, 8, 8, 8, 8]


def test_a_reply_with_a_tool_turn_keeps_the_call_and_result_apart_from_its_text():
    from plutao.experiments.serve.replies import Choice, turn_messages
    from plutao.tokenizer import TOOL_TOKENS, CharTokenizer, grown
    from plutao.tokenizer.chat import reply_messages, reply_stop_ids

    tok = grown(CharTokenizer.train(["What is 4821+3379? 0123456789 calculator: so"]), TOOL_TOKENS)
    model = [tok.call_id, *tok.encode("calculator: 4821+3379"), tok.tool_id]
    forced = [*tok.encode("8200"), tok.end_id, tok.assistant_id]
    after = [*tok.encode("so 8200"), tok.end_id]
    c = Choice(tok, [], reply_stop_ids(tok), tools=True)
    streamed = "".join([c.add(eng.Event(model[:5], [0.0] * 5)), c.add(eng.Event(model[5:], [0.0] * (len(model) - 5))),
                        c.add(eng.Event(forced, [0.0] * len(forced), forced=True)),
                        c.add(eng.Event(after, [0.0] * len(after), "stop"))])
    assert streamed == c.text == "so 8200" and c.finish == "stop" and c.generated == len(model) + len(after) - 1
    want = reply_messages(tok, model + forced + after, range(len(model), len(model) + len(forced)))
    assert turn_messages(c.turns) == want[:-1]  # (the call and its result, as the agent loop reads them back)
    assert [t["content"] for t in turn_messages(c.take_turns()) if t["role"] == "tool"] == ["8200"]
    assert c.take_turns() == []


def test_a_tool_result_is_never_cut_to_a_few_tokens_by_a_long_reply_budget():
    from plutao.tokenizer.chat import result_tokens

    assert result_tokens(192, 41, 4) == 48  # (the report card's budget: a quarter of the context)
    assert result_tokens(192, 168, 4) == 48 and result_tokens(32, 300, 4) == 8  # (once 2 and 1: results cut short)
    assert result_tokens(4096, 100, 4) == (4096 - 2 - 100) // 5 - 2


def test_a_failed_device_ends_every_request_with_an_error_and_refuses_new_work(running):
    e, fake = running(n_slots=2, chunk=1)

    def broken(*a, **k):
        raise RuntimeError("device lost")

    fake.fill = broken
    got = [submit(e, [3], SamplingConfig(max_new_tokens=5)) for _ in range(3)]
    for _, c in got:
        assert c.done.wait(2) and c.finish == "error"
    with pytest.raises(eng.Stopping, match="the engine failed"):
        submit(e, [3], SamplingConfig(max_new_tokens=5))
    with pytest.raises(eng.Stopping):
        e.call("m", lambda b: 1).result(timeout=1)


def test_a_failing_tool_turn_ends_only_its_own_request(running):
    e, _ = running(n_slots=2, chunk=1)

    def broken(row, reply, calls):
        raise ValueError("tool crashed")

    s = SamplingConfig(max_new_tokens=20, stop_ids=(12,), stop_at_eot=False)
    c = Collect()
    e.submit(eng.Request("m", [5], s, c, answer=broken, pause_id=12))
    _, other = submit(e, [30], SamplingConfig(max_new_tokens=15, stop_at_eot=False))
    assert c.done.wait(2) and c.finish == "error" and other.done.wait(2) and other.finish == "length"
    assert settle(e)


def settle(e, seconds=1.0):
    deadline = time.monotonic() + seconds
    while e.slots_in_use() and time.monotonic() < deadline:
        time.sleep(0.01)
    return e.slots_in_use() == 0


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_a_character_split_between_tokens_waits_for_the_rest_of_it(kind):
    from plutao.experiments.serve.replies import Choice
    from plutao.tokenizer import train_tokenizer

    # (sentencepiece's byte fallback decodes a cut character as one U+FFFD per byte so far)
    tok = train_tokenizer(kind, ["the quick brown fox jumps over the lazy dog " * 50], vocab_size=300)
    ids = tok.encode("ab 😀 cd é!")
    c = Choice(tok, [], ())
    streamed = "".join(c.add(eng.Event([t], [0.0])) for t in ids[:-1]) + c.add(eng.Event(ids[-1:], [0.0], "length"))
    assert streamed == c.text == "ab 😀 cd é!"
