"""The HTTP API: OpenAI's completions, chat completions and models routes (shapes as the official client
parses them), ours for rewards, tokenization, health and Prometheus metrics, and the web chat at `/`.

Each generation request becomes one engine Request per choice (serve/engine.py); the engine thread
hands tokens back through `loop.call_soon_threadsafe` into the request's asyncio queue. Text is decoded
incrementally (a partial multi-byte character waits), stop strings are matched on the text (the request
is cancelled at once, its slot freed), and a client that goes away cancels its requests too.
Log-probs are the model's at temperature 1 from one scoring pass over prompt and reply (what
`plutao score` computes), so `logprobs`, `echo` and `plutao score` agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plutao.experiments.serve.guard import Guard
from plutao.experiments.serve.metrics import Metrics
from plutao.experiments.serve.replies import Choice, turn_messages
from plutao.experiments.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    RewardRequest,
    Sampling,
    TokenizeRequest,
)
from plutao.experiments.serve.served import MAX_CALLS, Served, token_logprobs, warm_scoring
from plutao.model import engine as eng
from plutao.model.sampling import SamplingConfig, SamplingError
from plutao.tokenizer import TokenizerError
from plutao.tokenizer import chat as template
from plutao.tools import TOOLS
from plutao.train.config.errors import UserError

PAGE = Path(__file__).with_name("page.html")


@dataclasses.dataclass
class Generation:
    """The engine requests of one API request (one per choice), the queue their events arrive on, and the
    replies being written."""

    queue: asyncio.Queue
    choices: list[Choice]
    requests: list
    begun: float


def create_app(served: dict[str, Served], engine: eng.Engine, *, api_key: str | None = None,
               timeout: float | None = None, chunk: int = 4) -> FastAPI:
    metrics = Metrics(engine)
    state = {"ready": False, "error": None}

    def warm():
        try:
            for name, s in served.items():
                if s.backend is not None and hasattr(s.backend, "warm"):
                    engine.call(name, lambda b: b.warm(chunk)).result()
                    engine.call(name, lambda b, s=s: warm_scoring(s)).result()  # (logprobs and echo)
            state["ready"] = True
        except Exception as e:  # noqa: BLE001 (reported by /health, never a hang)
            state["error"] = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine.thread is None:
            engine.start()
        threading.Thread(target=warm, name="plutao-warm", daemon=True).start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop, 5.0)

    app = FastAPI(title="plutao", lifespan=lifespan)
    app.state.plutao = state

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), type=kind).response()

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    def model_of(name: str) -> Served:
        if name not in served:
            raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists the ones that are "
                           f"({', '.join(served)})", type="not_found_error", param="model", code="model_not_found")
        return served[name]

    def sampling_for(s: Served, req: Sampling, max_tokens: int, stop_ids, seed: int, ban=()) -> SamplingConfig:
        try:
            return SamplingConfig(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, max_new_tokens=max_tokens,
                                  seed=seed, stop_ids=tuple(stop_ids), banned_ids=(
                                      *s.tokenizer.unsampled_ids(tuple(stop_ids), s.model.cfg.vocab_size), *ban))
        except SamplingError as e:
            raise ApiError(400, str(e)) from None

    def check_fits(s: Served, n_prompt: int, max_tokens: int, start: int = 0) -> None:
        """`start`: tokens the model reads before the prompt (a completion's <|endoftext|>)."""
        total = n_prompt + start + max_tokens
        if total > s.context:
            with_start = f" ({n_prompt + start} with the <|endoftext|> it starts from)" if start else ""
            raise ApiError(400, f"the prompt is {n_prompt} tokens{with_start} and max_tokens is {max_tokens}: {total} is "
                           f"more than the model's context of {s.context} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    def decoder(s: Served, what: str) -> None:
        if s.judges:
            raise ApiError(400, f"{s.name} is a reward model: it scores replies (POST /v1/rewards), it does not write "
                           f"{what}", param="model")

    def submit(s: Served, prompts: list[list[int]], samplings: list[SamplingConfig], stops: list[str], stop_ids,
               answer=None) -> Generation:
        """Hand one engine request per choice to the engine (`answer`: the replies may call the run's tools);
        a full queue or a stopping server is refused here, before any response has started (429, 503)."""
        loop = asyncio.get_running_loop()
        gen = Generation(asyncio.Queue(), [Choice(s.tokenizer, stops, stop_ids, tools=answer is not None)
                                           for _ in prompts], [], time.perf_counter())
        for i, (p, sp) in enumerate(zip(prompts, samplings)):
            gen.requests.append(eng.Request(
                s.name, p, sp, lambda ev, i=i: loop.call_soon_threadsafe(gen.queue.put_nowait, (i, ev)), timeout=timeout,
                answer=answer, pause_id=s.tokenizer.tool_id if answer else -1, max_calls=MAX_CALLS))
        try:
            for r in gen.requests:
                engine.submit(r)
                metrics.prompt_tokens(len(r.prompt))
        except (eng.QueueFull, eng.Stopping) as e:
            for r in gen.requests:
                engine.cancel(r)
            if isinstance(e, eng.QueueFull):
                raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                               headers={"Retry-After": "1"}) from None
            raise ApiError(503, str(e), type="server_error") from None
        return gen

    async def follow(request: Request, gen: Generation) -> AsyncIterator[tuple[int, Choice, str]]:
        """Yield (choice index, choice, new text) as tokens arrive, until every choice is done; a client that
        goes away (checked at least every 0.25 s) cancels them all."""
        left, checked = len(gen.requests), time.perf_counter()
        try:
            while left:
                try:
                    i, ev = await asyncio.wait_for(gen.queue.get(), 0.25)
                except asyncio.TimeoutError:
                    i = ev = None
                now = time.perf_counter()
                if now - checked >= 0.25 or ev is None:
                    checked = now
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                c = gen.choices[i]
                if c.finish is not None:
                    continue
                if ev.finish == "timeout":
                    raise ApiError(408, f"the request took longer than the server's --timeout of {timeout:g} s; its "
                                   "slot is freed", type="timeout_error", code="timeout")
                if ev.finish == "error":
                    raise ApiError(500, ev.error, type="server_error")
                if ev.tokens and not ev.forced:
                    metrics.tokens_out(len(ev.tokens))
                    if c.first_at is None:
                        metrics.first_token(now - gen.begun)
                        c.first_at = now
                    elif c.last_at is not None:
                        metrics.between_tokens((now - c.last_at) / len(ev.tokens))
                    c.last_at = now
                new = c.add(ev)
                if c.hit:
                    engine.cancel(gen.requests[i])
                if c.finish is not None:
                    left -= 1
                yield i, c, new
        finally:
            for r in gen.requests:
                engine.cancel(r)
            metrics.latency(time.perf_counter() - gen.begun)

    def seeds(req: Sampling, n: int) -> list[int]:
        if req.seed is None:
            return [secrets.randbelow(2 ** 31) for _ in range(n)]
        return [(req.seed + i) % 2 ** 31 for i in range(n)]  # (choice i of a seeded request: seed + i)

    def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
        out = sum(c.generated for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}

    async def logprob_rows(s: Served, ids: list[int], k: int):
        return await asyncio.wrap_future(engine.call(s.name, lambda b: token_logprobs(s, ids, k)))

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    # --- routes ---------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if state["error"] or engine.crashed is not None:
            return JSONResponse({"status": "failed", "error": state["error"] or f"the engine failed: {engine.crashed}"},
                                status_code=503)
        if engine.stopping or not state["ready"]:
            return JSONResponse({"status": "stopping" if engine.stopping else "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": int(s.run_dir.stat().st_mtime), "owned_by": "plutao",
             "stage": s.stage, "chat": s.chat, "reward_model": s.judges, "context_length": s.context,
             "tools": s.has_tools} for s in served.values()]}

    def model_or_only(name: str | None) -> Served:
        """The named model, or with no name the one decoder served (vLLM's tokenizer routes take no model)."""
        if name is not None:
            return model_of(name)
        decoders = [s for s in served.values() if not s.judges]
        if len(decoders) != 1:
            raise ApiError(400, f"give \"model\": this server serves {', '.join(served)}", param="model")
        return decoders[0]

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None):
        """The tokenizer's special tokens, in the shape vLLM gives them (lm-evaluation-harness's remote
        tokenizer reads it)."""
        s = model_or_only(model)
        tok = s.tokenizer
        return {"model": s.name, "eos_token": tok.token_strings([tok.eot_id])[0], "bos_token": None,
                "pad_token": tok.token_strings([tok.pad_id])[0], "max_model_len": s.context,
                "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        s = model_or_only(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give either prompt (text) or messages (a chat, through the run's template)")
        try:
            ids = (template.prompt_ids(req.messages, s.tokenizer) if req.messages is not None
                   else s.tokenizer.encode(req.prompt))
        except (TokenizerError, UserError, ValueError) as e:
            raise ApiError(400, str(e), param="messages" if req.messages is not None else "prompt") from None
        return {"tokens": [int(i) for i in ids], "count": len(ids), "max_model_len": s.context,
                "token_strings": s.tokenizer.token_strings(list(ids))}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        s = model_or_only(req.model)
        bad = [i for i in req.tokens if not 0 <= i < s.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is not in the vocabulary (0..{s.tokenizer.vocab_size - 1})",
                           param="tokens")
        return {"prompt": s.tokenizer.decode(req.tokens)}

    @app.post("/v1/rewards")
    async def rewards(req: RewardRequest):
        s = model_of(req.model)
        if not s.judges:
            raise ApiError(400, f"{s.name} is not a reward model; serve a `plutao reward` run to score replies",
                           param="model")
        try:
            messages = template.check_messages(req.messages)
            template.reward_ids(messages, s.tokenizer)
        except (TokenizerError, UserError, ValueError) as e:
            raise ApiError(400, str(e), param="messages") from None
        score = await asyncio.wrap_future(engine.call(s.name, lambda b: float(s.scorer.score([messages])[0])))
        return {"object": "reward", "model": s.name, "score": score}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        s = model_of(req.model)
        decoder(s, "completions")
        tok = s.tokenizer
        p = req.prompt
        texts = [p] if isinstance(p, str) else p if p and isinstance(p[0], str) else None
        try:
            ids = ([tok.encode(t) for t in texts] if texts is not None else
                   [list(p)] if not p or isinstance(p[0], int) else [list(x) for x in p])
        except (TokenizerError, UserError, ValueError) as e:
            raise ApiError(400, f"prompt: {e}", param="prompt") from None
        if any(not 0 <= i < tok.vocab_size for x in ids for i in x):
            raise ApiError(400, f"prompt: token ids must be in 0..{tok.vocab_size - 1}", param="prompt")
        if req.stream and req.logprobs is not None:
            raise ApiError(400, "logprobs are computed after the reply (one scoring pass); ask for them without stream",
                           param="logprobs")
        max_tokens = req.max_tokens or 16
        for x in ids:
            check_fits(s, len(x), max_tokens, start=1)
        stop_ids = (tok.eot_id,)
        stops = req.stops()
        prompts = [[tok.eot_id] + x for x in ids for _ in range(req.n)]
        samplings = [sampling_for(s, req, max_tokens, (), seed) for seed in seeds(req, len(prompts))]
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(i, text, finish, logprobs=None):
            return {"id": rid, "object": "text_completion", "created": created, "model": s.name,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        prompt_count = sum(len(x) for x in ids)  # (each prompt once, however many choices it has)
        gen = submit(s, prompts, samplings, stops, stop_ids)
        if req.stream:
            async def events():
                done = []
                try:
                    if req.echo:  # (each choice's prompt first, as the text it was given)
                        for i in range(len(prompts)):
                            yield sse(chunk(i, texts[i // req.n] if texts else tok.decode(ids[i // req.n]), None))
                    async for i, c, new in follow(request, gen):
                        if new or c.finish:
                            yield sse(chunk(i, new, c.finish))
                        if c.finish:
                            done.append(c)
                    if req.stream_options and req.stream_options.include_usage:
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": s.name,
                                   "choices": [], "usage": usage(prompt_count, done)})
                except ApiError as e:
                    yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        choices: list[Choice] = [None] * len(prompts)
        async for i, c, _ in follow(request, gen):
            choices[i] = c
        if any(c is None or c.finish is None for c in choices):
            return Response(status_code=499)  # (the client went away)
        out = []
        for i, c in enumerate(choices):
            head = ids[i // req.n]
            text = ((texts[i // req.n] if texts else tok.decode(head)) if req.echo else "") + c.text
            logprobs = None
            if req.logprobs is not None:  # (a reply that stopped on <|endoftext|> lists it last, as its text does not)
                ended = [c.stop_token] if c.stop_token is not None and not c.hit else []
                logprobs = await completion_logprobs(s, head, c.tokens + ended, req.logprobs, req.echo)
            out.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish})
        return {"id": rid, "object": "text_completion", "created": created, "model": s.name, "choices": out,
                "usage": usage(prompt_count, choices)}

    async def completion_logprobs(s: Served, prompt: list[int], reply: list[int], k: int, echo: bool) -> dict:
        tok = s.tokenizer
        nxt, top_lp, top_ids = await logprob_rows(s, [tok.eot_id] + prompt + reply, max(k, 1))
        shown = (prompt + reply) if echo else reply
        at = 0 if echo else len(prompt)
        strings = tok.token_strings(shown)
        offsets, pos = [], 0
        for t in strings:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": strings, "token_logprobs": [float(x) for x in nxt[at:at + len(shown)]],
                "top_logprobs": [{tok.token_strings([int(j)])[0]: float(v) for j, v in zip(top_ids[r][:k], top_lp[r][:k])}
                                 for r in range(at, at + len(shown))] if k else None,
                "text_offset": offsets}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        s = model_of(req.model)
        decoder(s, "chat replies")
        # (a base run was not trained on the template: it continues the conversation's text as best it can,
        # as in `plutao chat` — what the compare view shows next to the stages that were)
        tok = s.tokenizer
        try:
            messages = template.check_messages([m.model_dump(exclude_none=True) for m in req.messages], generation=True)
            prompt = template.prompt_ids(messages, tok)
        except (TokenizerError, UserError, ValueError) as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        if req.stream and req.logprobs:
            raise ApiError(400, "logprobs are computed after the reply (one scoring pass); ask for them without stream",
                           param="logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens or max(s.context - len(prompt), 1)
        check_fits(s, len(prompt), max_tokens)
        answer = None
        if s.has_tools and req.tool_choice != "none":  # (a run trained to call tools calls them, as in `plutao chat`)
            if req.logprobs:
                raise ApiError(400, f"{s.name} may call tools, and log-probs of a reply with tool turns are not given; "
                               "send tool_choice: \"none\" with logprobs", param="logprobs")
            answer = template.tool_answerer(tok, TOOLS, max_calls=MAX_CALLS, max_result_tokens=template.result_tokens(
                s.context, max_tokens, MAX_CALLS))
        stop_ids = template.reply_stop_ids(tok)
        # (with tool_choice "none" a run that can call tools may not open a call: it answers itself)
        ban = (tok.call_id,) if s.has_tools and answer is None else ()
        samplings = [sampling_for(s, req, max_tokens, stop_ids + ((tok.tool_id,) if answer else ()), seed, ban)
                     for seed in seeds(req, req.n)]
        stops = req.stops()
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.name}
        # (the sampler also stops at <|endoftext|>: a base run chatting often ends so; it is no reply text)
        gen = submit(s, [prompt] * req.n, samplings, stops, stop_ids + (tok.eot_id,), answer)
        if req.stream:
            async def events():
                done = []
                try:
                    for i in range(req.n):
                        yield sse(head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})
                    async for i, c, new in follow(request, gen):
                        for turn in c.take_turns():  # (a call and its result, as they happen)
                            yield sse(head | {"choices": [{"index": i, "delta": {"tool_turns": turn_messages(
                                [turn], len(c.turns) - 1)}, "logprobs": None, "finish_reason": None}]})
                        if new:
                            yield sse(head | {"choices": [{"index": i, "delta": {"content": new}, "logprobs": None,
                                                           "finish_reason": None}]})
                        if c.finish:
                            done.append(c)
                            yield sse(head | {"choices": [{"index": i, "delta": {}, "logprobs": None,
                                                           "finish_reason": c.finish}]})
                    if req.stream_options and req.stream_options.include_usage:
                        yield sse(head | {"choices": [], "usage": usage(len(prompt), done)})
                except ApiError as e:
                    yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        choices: list[Choice] = [None] * req.n
        async for i, c, _ in follow(request, gen):
            choices[i] = c
        if any(c is None or c.finish is None for c in choices):
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            logprobs = None
            if req.logprobs:
                logprobs = {"content": await chat_logprobs(s, prompt, c.tokens, req.top_logprobs or 0)}
            message = {"role": "assistant", "content": c.text}
            if c.turns:  # (the calls it made and their results, as OpenAI messages: already answered)
                message["tool_turns"] = turn_messages(c.turns)
            out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": c.finish})
        return {"id": rid, "object": "chat.completion", "created": created, "model": s.name, "choices": out,
                "usage": usage(len(prompt), choices)}

    async def chat_logprobs(s: Served, prompt: list[int], reply: list[int], k: int) -> list[dict]:
        tok = s.tokenizer
        nxt, top_lp, top_ids = await logprob_rows(s, prompt + reply, max(k, 1))
        at = len(prompt) - 1

        def entry(token_id, lp):
            text = tok.token_strings([int(token_id)])[0]
            return {"token": text, "logprob": float(lp), "bytes": list(text.encode("utf-8"))}

        return [entry(t, nxt[at + j]) | {"top_logprobs": [entry(a, v) for a, v in zip(top_ids[at + j][:k],
                                                                                     top_lp[at + j][:k])]}
                for j, t in enumerate(reply)]

    return app
