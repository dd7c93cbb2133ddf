"""The serving engine: one thread owns every model's decoding slots and runs the compiled programs;
requests come in on a thread-safe queue and their tokens go back through each request's callback.

Continuous batching over `model/decode.py`'s SlotDecoder: between decode chunks the scheduler frees the
slots of finished, stopped, timed-out and cancelled (disconnected) requests at once, then admits
waiting requests into free slots (prefilled alone, or in groups of up to MAX_FILL padded to MAX_FILL with
copies of the group's last entry — writing a slot twice with the same values is writing it once — and
prompts left-padded to a power-of-two width of at least MIN_WIDTH, so admitting never compiles a new
program: every one was compiled before the server said it was ready), then advances every active slot by `chunk` tokens. A row's
random stream is a function of its own seed and position (model/decode.py), so a seeded request gives
the same tokens whatever it is batched with.

A request that may call tools (`answer`, as model/agent.py's loop takes it) stops at its pause token
(<|tool|>); the scheduler runs the call, appends the result to the live slot (model/agent.py: extend,
the row's random stream and budget going on) and the row decodes on — the other rows never wait for
more than that one extension.

`Backend` is what the scheduler drives: `DecoderBackend` over a real model, or a hand-computable fake in
the tests (the scheduler, threads and queues are the real ones).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from plutao.model.sampling import SamplingConfig, prompt_width

MAX_FILL = 8  # requests prefilled in one program (a group of one is prefilled alone, a larger one padded to 8)
MIN_WIDTH = 8  # prompts are left-padded to at least this many tokens (then powers of two): fewer programs
FINISHED = ("stop", "length")  # a row that ended by itself; "timeout", "cancelled", "error" are the engine's


class QueueFull(Exception):
    """The engine holds its --max-queue waiting requests already (the server answers 429)."""


class Stopping(Exception):
    """The engine is shutting down, or has failed, and admits nothing new (the server answers 503)."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request receives: new tokens with their log-probs (the model's, temperature 1), and when
    it is over why (`stop`, `length`, `timeout`, `cancelled`, `error`)."""

    tokens: list[int]
    logprobs: list[float]
    finish: str | None = None
    error: str = ""
    forced: bool = False  # the runtime wrote these tokens (a tool's result), not the model


@dataclasses.dataclass(eq=False)
class Request:
    model: str
    prompt: list[int]
    sampling: SamplingConfig
    on_event: Callable[[Event], None]  # called on the engine thread; must not block
    timeout: float | None = None  # seconds from submission; then finish "timeout" and the slot is freed
    cancelled: bool = False  # set by the caller (a client went away, a stop string matched): freed at once
    answer: Callable[[int, list[int], int], list[int]] | None = None  # tool calls: (row, reply, calls) → tokens
    pause_id: int = -1  # the token that closes a call (in the sampling's stop ids when `answer` is set)
    max_calls: int = 4
    submitted: float = 0.0
    slot: int | None = None
    produced: int = 0
    calls: int = 0
    reply: list[int] = dataclasses.field(default_factory=list)


class Backend(Protocol):
    n_slots: int
    context: int
    stop_ids: Callable[[SamplingConfig], tuple[int, ...]]

    def fill(self, slot_ids: list[int], prompts: list[list[int]], samplings: list[SamplingConfig]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...  # (N,) tokens, log-probs, still active

    def run(self, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...  # (B, k) ×3, (B,) active

    def release(self, slot_ids: list[int]) -> None: ...

    def extend(self, slot_ids: list[int], forced: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def fill_groups(n: int) -> list[int]:
    """How n admitted requests are prefilled: groups of MAX_FILL, then the rest as one group."""
    return [MAX_FILL] * (n // MAX_FILL) + ([n % MAX_FILL] if n % MAX_FILL else [])


def padded_count(n: int) -> int:
    """The rows a fill group of n is prefilled as: 1 alone, else MAX_FILL (two programs per width)."""
    return 1 if n <= 1 else MAX_FILL


class DecoderBackend:
    """A model's decoding slots (model/decode.py: SlotDecoder) as the scheduler uses them."""

    def __init__(self, model, *, n_slots: int, eot_id: int, pad_id: int, tool_results: int = 0):
        from plutao.model.decode import SlotDecoder, _stop_set

        self.decoder = SlotDecoder.of(model, eot_id=eot_id, pad_id=pad_id)
        self.n_slots, self.context, self.eot_id = n_slots, self.decoder.context, eot_id
        self.slots = self.decoder.empty(n_slots)
        self.stop_ids = lambda s: _stop_set(s, eot_id)
        self.tool_results = tool_results  # (a run that calls tools: the longest result the warm-up extends by)

    def fill(self, slot_ids, prompts, samplings):
        from plutao.model.decode import _host

        n = len(slot_ids)
        pad = padded_count(n) - n
        ids, prompts, samplings = (list(x) + [x[-1]] * pad for x in (slot_ids, prompts, samplings))
        self.slots, e = self.decoder.fill(self.slots, ids, prompts, samplings, MIN_WIDTH)
        e, active = _host((e, self.slots.active_B))
        return np.asarray(e.tokens)[:n], np.asarray(e.model_logprobs)[:n], np.asarray(active)[slot_ids]

    def run(self, steps):
        from plutao.model.decode import _host

        self.slots, out = self.decoder.run(self.slots, steps)
        out, active = _host((out, self.slots.active_B))
        return np.asarray(out.tokens), np.asarray(out.model_logprobs), np.asarray(out.valid), np.asarray(active)

    def release(self, slot_ids):
        self.slots = self.slots._replace(active_B=self.slots.active_B.at[np.asarray(slot_ids)].set(False))

    def extend(self, slot_ids, forced):
        from plutao.model.agent import extend
        from plutao.model.decode import _host

        self.slots, e = extend(self.decoder, self.slots, slot_ids, forced)
        e, active = _host((e, self.slots.active_B))
        return np.asarray(e.tokens), np.asarray(e.model_logprobs), np.asarray(active)[list(slot_ids)]

    def warm(self, chunk: int) -> int:
        """Compile every program the scheduler can call (each prompt-width bucket × fill-group size, and the
        decode chunk, and for a run that calls tools each width of a result written into a slot) before the
        server says it is ready; returns how many fills it ran."""
        widths = sorted({prompt_width(max(n, MIN_WIDTH), self.context) for n in range(1, self.context + 1)})
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=1)
        runs = 0
        for w in widths:
            for count in (1, 2) if self.n_slots > 1 else (1,):  # (a group of 2 or more runs as MAX_FILL rows)
                self.fill(list(range(count)), [[self.eot_id] * w] * count, [greedy] * count)
                runs += 1
        self.run(chunk)
        if self.tool_results:  # (a result, <|end|> and <|assistant|> after the token the row paused on)
            for w in sorted({prompt_width(n + 3, self.context) for n in range(1, self.tool_results + 1)}):
                self.fill([0], [[self.eot_id] * MIN_WIDTH], [greedy])
                self.extend([0], [[self.eot_id] * (w - 1)])
        self.release(list(range(self.n_slots)))
        return runs


@dataclasses.dataclass
class ModelSlots:
    backend: Backend
    owner: list[Request | None]
    waiting: collections.deque


class Engine:
    """The scheduler thread over one or more models' backends (see the module's docstring)."""

    def __init__(self, backends: dict[str, Backend], *, max_queue: int = 256, chunk: int = 4,
                 clock: Callable[[], float] = time.monotonic):
        self.models = {name: ModelSlots(b, [None] * b.n_slots, collections.deque()) for name, b in backends.items()}
        self.max_queue, self.chunk, self.clock = max_queue, chunk, clock
        self.cond = threading.Condition()
        self.calls: collections.deque = collections.deque()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        self.admitting: list[Request] = []  # (taken from a queue, not yet in a slot: failed too if the device fails)

    # --- the caller's side (any thread) -----------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self.cond:
            if self.crashed is not None:
                raise Stopping(f"the engine failed ({self.crashed}); restart the server")
            if self.stopping:
                raise Stopping("the server is shutting down")
            if self.queue_depth() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            request.submitted = self.clock()
            self.models[request.model].waiting.append(request)
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self.cond:
            self.cond.notify()

    def call(self, model: str, fn: Callable) -> concurrent.futures.Future:
        """Run fn(backend) on the engine thread between steps (device work that is not decoding)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self.crashed is not None:
                future.set_exception(Stopping(f"the engine failed ({self.crashed}); restart the server"))
                return future
            self.calls.append((model, fn, future))
            self.cond.notify()
        return future

    def queue_depth(self) -> int:
        return sum(len(m.waiting) for m in self.models.values())

    def slots_in_use(self) -> int:
        return sum(o is not None for m in self.models.values() for o in m.owner)

    def idle(self) -> bool:
        return not self.queue_depth() and not self.slots_in_use() and not self.calls

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="plutao-engine", daemon=True)
        self.thread.start()

    def stop(self, grace: float) -> bool:
        """Admit nothing new; let what is running finish within `grace` seconds, then cancel the rest.
        True when everything finished in time."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        deadline = time.monotonic() + grace
        while not self.idle() and time.monotonic() < deadline and self.crashed is None:
            time.sleep(0.02)
        clean = self.idle()
        with self.cond:
            for m in self.models.values():
                for r in [*m.waiting, *(o for o in m.owner if o is not None)]:
                    r.cancelled = True
            self.cond.notify()
        time.sleep(0.05)
        return clean

    # --- the engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    if not self._has_work():
                        if self.stopping:
                            return
                        self.cond.wait(0.05)
                        continue
                    calls, self.calls = list(self.calls), collections.deque()
                for model, fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(self.models[model].backend))
                        except Exception as e:  # noqa: BLE001 (a failed call is its caller's error, never the engine's)
                            future.set_exception(e)
                for m in self.models.values():
                    self._tick(m)
        except BaseException as e:  # noqa: BLE001 (the device failed: every request still here gets an error)
            with self.cond:
                self.crashed = e
                left = [*self.admitting, *(r for m in self.models.values() for r in
                                          [*m.waiting, *(o for o in m.owner if o is not None)])]
                calls, self.calls = list(self.calls), collections.deque()
            for r in left:
                self._send(r, Event([], [], "error", f"the engine failed: {e}"))
            for _, _, future in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(Stopping(f"the engine failed ({e}); restart the server"))

    def _has_work(self) -> bool:
        return bool(self.calls) or any(m.waiting or any(o is not None for o in m.owner) for m in self.models.values())

    def _send(self, r: Request, event: Event) -> bool:
        try:
            r.on_event(event)
            return True
        except Exception:  # noqa: BLE001 (one request's failure never reaches another)
            r.cancelled = True
            return False

    def _free(self, m: ModelSlots, slots: list[int]) -> None:
        if slots:
            m.backend.release(slots)
            for s in slots:
                m.owner[s] = None

    def _tick(self, m: ModelSlots) -> None:
        now = self.clock()
        ended = []
        for s, r in enumerate(m.owner):
            if r is None:
                continue
            late = r.timeout is not None and now - r.submitted > r.timeout
            if r.cancelled or late:
                ended.append(s)
                if late and not r.cancelled:
                    self._send(r, Event([], [], "timeout"))
        self._free(m, ended)
        with self.cond:  # (requests cancelled or timed out while waiting never take a slot)
            keep = collections.deque()
            for r in m.waiting:
                if r.timeout is not None and now - r.submitted > r.timeout:
                    self._send(r, Event([], [], "timeout"))
                elif not r.cancelled:
                    keep.append(r)
            m.waiting = keep
            free = [s for s, o in enumerate(m.owner) if o is None]
            admitted = [m.waiting.popleft() for _ in range(min(len(free), len(m.waiting)))]
            self.admitting = list(admitted)
        at = 0
        for size in fill_groups(len(admitted)):
            group, slots = admitted[at:at + size], free[at:at + size]
            at += size
            tokens, logprobs, active = m.backend.fill(slots, [r.prompt for r in group], [r.sampling for r in group])
            for s, r, t, lp, a in zip(slots, group, tokens, logprobs, active):
                r.slot, m.owner[s] = s, r
                self._deliver(m, r, [int(t)], [float(lp)], bool(a))
        self.admitting = []
        if not any(o is not None for o in m.owner):
            return
        tokens, logprobs, valid, active = m.backend.run(self.chunk)
        for s, r in enumerate(m.owner):
            if r is not None:
                keep = valid[s]
                self._deliver(m, r, tokens[s][keep].tolist(), logprobs[s][keep].tolist(), bool(active[s]))

    def _deliver(self, m: ModelSlots, r: Request, tokens: list[int], logprobs: list[float], active: bool) -> None:
        r.produced += len(tokens)
        r.reply += tokens
        if r.cancelled:
            return
        paused = (not active and r.answer is not None and tokens and tokens[-1] == r.pause_id
                  and r.produced < r.sampling.max_new_tokens and r.calls <= r.max_calls)
        finish = None
        if not active and not paused:
            finish = "stop" if tokens and tokens[-1] in m.backend.stop_ids(r.sampling) else "length"
        if not self._send(r, Event(tokens, logprobs, finish)):
            self._free(m, [r.slot])
            return
        if finish is not None:  # (the row stopped by itself: its slot is idle on the device already)
            m.owner[r.slot] = None
        elif paused:  # (run the call, write its result into the slot, and let the row go on)
            try:
                forced = list(r.answer(r.slot, list(r.reply), r.calls))
                r.calls += 1
                r.reply += forced
                if not self._send(r, Event(forced, [0.0] * len(forced), None, forced=True)):
                    self._free(m, [r.slot])
                    return
                token, logprob, still = m.backend.extend([r.slot], [forced])
            except Exception as e:  # noqa: BLE001 (this request's tool turn failed: it ends, the others go on)
                self._send(r, Event([], [], "error", f"the tool turn failed: {type(e).__name__}: {e}"))
                self._free(m, [r.slot])
                return
            self._deliver(m, r, [int(token[0])], [float(logprob[0])], bool(still[0]))


def requests_in(engine: Engine) -> Sequence[Request]:
    """Every request the engine holds (waiting or in a slot), for tests and shutdown."""
    return [r for m in engine.models.values() for r in [*m.waiting, *(o for o in m.owner if o is not None)]]
