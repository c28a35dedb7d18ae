"""`python -m swarm.api`: an OpenAI-compatible HTTP API over the swarm, and fine-tuning jobs.

    GET  /v1/models                OpenAI: the model this API serves
    POST /v1/completions           OpenAI: completions (max_tokens, temperature, top_p, stop, seed, n, stream)
    POST /v1/chat/completions      OpenAI: chat completions with the model's chat template
    GET  /health                   200 while the swarm connection is up (no key needed)
    POST /chat                     {"prompt", "max_tokens", "temperature", "adapter"} -> {"text", ...}
    POST /fine-tune                start a fine-tuning job through the swarm (`swarm.api.jobs`)
    GET  /jobs, GET /jobs/{id}     status, progress, loss;  DELETE /jobs/{id} cancels

One swarm connection (one DHT node, one `AutoDistributedModelForCausalLM`) serves every request.
Concurrent requests are generated together (`swarm.api.engine`): one batched session carries all of
them, so each step is one forward and one message per peer. Streams are server-sent events, token
pieces as they come.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Depends, FastAPI, Request  # module level: FastAPI resolves the route annotations here
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from swarm.api.schema import (
    ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessage, Completion, CompletionChoice, CompletionRequest,
    FineTuneRequest, SimpleChatReply, SimpleChatRequest, Usage,
)
from swarm.cli import fail, limit_openmp_spinning, serve_http, setup_logging
from swarm import settings
from swarm.api.config import ApiConfig
from swarm.errors import ConfigError, SwarmError

if TYPE_CHECKING:
    from swarm.api.engine import Engine

logger = logging.getLogger(__name__)


def create_app(engine: "Engine", jobs, api_key: str | None = None):
    app = FastAPI(title="swarm API", docs_url="/docs", redoc_url=None)

    def error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'][1:]) or 'body'}: {item['msg']}" for item in exc.errors())
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        return error(400, problems or "invalid request body", "invalid_request_error", param=".".join(str(p) for p in first[1:]) or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        return error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(ConfigError)
    async def bad_input(request: Request, exc: ConfigError):
        return error(400, str(exc), "invalid_request_error")

    @app.exception_handler(SwarmError)
    async def swarm_down(request: Request, exc: SwarmError):
        return error(503, f"the swarm could not serve this request: {exc}", "server_error", code="swarm_unavailable")

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise HTTPException(401, "missing or wrong API key: send Authorization: Bearer <key>")

    guarded = [Depends(authorized)]

    def check_model(name: str) -> None:
        if name not in (engine.name, Path(engine.name).name):
            raise HTTPException(404, f"model {name!r} is not served here; this API serves {engine.name!r}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "batching": engine.batching_stats()}

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "swarm"}]}

    async def choices(requests: list[tuple[int, object, int | None]], body, speculation) -> list[tuple[int, str, str, int]]:
        async def one(index, ids, seed):
            text, reason, tokens = "", None, 0
            async for piece, reason, tokens in engine.generate(
                ids, max_tokens=body.max_tokens or 256, temperature=body.temperature, top_p=body.top_p, seed=seed,
                stops=body.stops(), adapter=body.adapter, speculation=speculation,
            ):
                text += piece
            return index, text, reason, tokens
        return list(await asyncio.gather(*(one(*item) for item in requests)))

    def seeds(body, count: int) -> list[int | None]:
        return [None if body.seed is None else body.seed + offset for offset in range(count)]

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest):
        check_model(body.model)
        speculation = engine.speculation_for(body.speculation, body.speculative_tokens)
        prompts = [engine.encode(prompt) for prompt in body.prompts()]
        work = [(p * body.n + k, ids, seed) for p, ids in enumerate(prompts) for k, seed in enumerate(seeds(body, body.n))]
        if body.stream:
            return StreamingResponse(_stream_completion(engine, body, work, speculation), media_type="text/event-stream")
        results = await choices(work, body, speculation)
        prompt_tokens = sum(ids.shape[1] for ids in prompts)
        completion_tokens = sum(tokens for *_, tokens in results)
        return Completion(
            model=body.model, choices=[CompletionChoice(index=i, text=t, finish_reason=r) for i, t, r, _ in sorted(results)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens),
        )

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        speculation = engine.speculation_for(body.speculation, body.speculative_tokens)
        ids = engine.encode_chat(body.messages)
        work = [(k, ids, seed) for k, seed in enumerate(seeds(body, body.n))]
        if body.stream:
            return StreamingResponse(_stream_chat(engine, body, work, speculation), media_type="text/event-stream")
        results = await choices(work, body, speculation)
        completion_tokens = sum(tokens for *_, tokens in results)
        return ChatCompletion(
            model=body.model,
            choices=[ChatChoice(index=i, message=ChatMessage(role="assistant", content=t), finish_reason=r) for i, t, r, _ in sorted(results)],
            usage=Usage(prompt_tokens=ids.shape[1], completion_tokens=completion_tokens, total_tokens=ids.shape[1] + completion_tokens),
        )

    @app.post("/chat", dependencies=guarded, response_model=SimpleChatReply)
    async def simple_chat(body: SimpleChatRequest):
        ids = engine.encode(body.prompt)
        text, tokens = "", 0
        async for piece, _, tokens in engine.generate(
            ids, max_tokens=body.max_tokens, temperature=body.temperature, top_p=1.0, seed=None, stops=[], adapter=body.adapter,
            speculation=engine.speculation_for(body.speculation, body.speculative_tokens),
        ):
            text += piece
        return SimpleChatReply(text=text, prompt_tokens=ids.shape[1], completion_tokens=tokens)

    @app.post("/fine-tune", dependencies=guarded, status_code=201)
    async def fine_tune(body: FineTuneRequest):
        return jobs.start(body)

    @app.get("/jobs", dependencies=guarded)
    async def list_jobs():
        return {"object": "list", "data": jobs.all()}

    @app.get("/jobs/{job_id}", dependencies=guarded)
    async def get_job(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @app.delete("/jobs/{job_id}", dependencies=guarded)
    async def cancel_job(job_id: str):
        job = await asyncio.get_running_loop().run_in_executor(None, jobs.cancel, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    return app


def _sse(payload) -> str:
    return f"data: {payload.model_dump_json() if hasattr(payload, 'model_dump_json') else payload}\n\n"


async def _merged(engine: Engine, body, work, usage: dict, speculation) -> AsyncIterator[tuple[int, str, str | None]]:
    """(choice index, piece, finish reason) from all the choices' generations as they come; `usage`
    gets each choice's generated tokens."""
    queue: asyncio.Queue = asyncio.Queue()

    async def one(index, ids, seed):
        try:
            async for piece, reason, tokens in engine.generate(
                ids, max_tokens=body.max_tokens or 256, temperature=body.temperature, top_p=body.top_p, seed=seed,
                stops=body.stops(), adapter=body.adapter, speculation=speculation,
            ):
                usage[index] = tokens
                await queue.put((index, piece, reason))
        except Exception as exc:  # reported in the stream, which has already started
            await queue.put((index, exc, None))
        finally:
            await queue.put((index, None, None))

    tasks = [asyncio.create_task(one(*item)) for item in work]
    done = 0
    try:
        while done < len(tasks):
            index, piece, reason = await queue.get()
            if piece is None:
                done += 1
                continue
            if isinstance(piece, Exception):
                raise piece
            yield index, piece, reason
    finally:
        for task in tasks:
            task.cancel()


async def _stream_completion(engine: Engine, body: CompletionRequest, work, speculation) -> AsyncIterator[str]:
    stream_id, created, usage = f"cmpl-{uuid.uuid4().hex}", int(time.time()), {}
    try:
        async for index, piece, reason in _merged(engine, body, work, usage, speculation):
            chunk = Completion(id=stream_id, created=created, model=body.model,
                               choices=[CompletionChoice(index=index, text=piece, finish_reason=reason)])
            yield _sse(chunk)
        if (body.stream_options or {}).get("include_usage"):
            prompt_tokens = sum(ids.shape[1] for _, ids, _ in work)
            total = Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(usage.values()),
                          total_tokens=prompt_tokens + sum(usage.values()))
            yield _sse(Completion(id=stream_id, created=created, model=body.model, choices=[], usage=total))
    except SwarmError as exc:
        yield _sse(f'{{"error": {{"message": "{_json_text(exc)}", "type": "server_error", "param": null, "code": "swarm_unavailable"}}}}')
    yield "data: [DONE]\n\n"


async def _stream_chat(engine: Engine, body: ChatCompletionRequest, work, speculation) -> AsyncIterator[str]:
    import json

    stream_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, delta: dict, reason: str | None) -> str:
        return _sse(json.dumps({
            "id": stream_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "choices": [{"index": index, "delta": delta, "finish_reason": reason}],
        }))

    usage: dict = {}
    for index, *_ in work:
        yield chunk(index, {"role": "assistant", "content": ""}, None)
    try:
        async for index, piece, reason in _merged(engine, body, work, usage, speculation):
            yield chunk(index, {"content": piece} if piece else {}, reason)
        if (body.stream_options or {}).get("include_usage"):
            prompt_tokens = work[0][1].shape[1]
            yield _sse(json.dumps({
                "id": stream_id, "object": "chat.completion.chunk", "created": created, "model": body.model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(usage.values()),
                          "total_tokens": prompt_tokens + sum(usage.values())},
            }))
    except SwarmError as exc:
        yield _sse(json.dumps({"error": {"message": str(exc), "type": "server_error", "param": None, "code": "swarm_unavailable"}}))
    yield "data: [DONE]\n\n"


def _json_text(exc: Exception) -> str:
    import json

    return json.dumps(str(exc))[1:-1]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config = settings.parse(ApiConfig, argv, prog="python -m swarm.api", description=__doc__.split("\n\n")[0], env_prefix="SWARM_API_")
    except SwarmError as exc:
        return fail(str(exc))
    limit_openmp_spinning()  # before torch is imported: peers may share these cores
    from swarm.api.engine import Engine
    from swarm.api.jobs import JobManager

    engine = None
    try:
        network = config.client.network
        engine = Engine(config.model, network.initial_peers, config.client, max_batch=config.max_batch, lanes=config.lanes,
                        max_length=config.max_length, speculation=config.speculation)
        extra = ["--swarm-key", str(network.swarm_key_path)] if network.swarm_key_path else []
        jobs = JobManager(config.jobs_dir, config.data_root, model=config.model, initial_peers=network.initial_peers, extra_args=extra)
        serve_http(create_app(engine, jobs, config.api_key), config.host, config.port,
                   f"swarm: API on http://{config.host}:{config.port}/v1 serving {config.model}")
        return 0
    except SwarmError as exc:
        return fail(str(exc))
    finally:
        if engine is not None:
            engine.close()
