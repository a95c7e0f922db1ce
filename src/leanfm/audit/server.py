"""``leanfm serve``: an OpenAI-style completions endpoint over any causal LM leanfm loads (FastAPI + uvicorn).

Why here: a prompt audit must run against a model behind an API, exactly as an attacker would see it. The
endpoint implements what lm-evaluation-harness and :class:`leanfm.audit.victim.HttpScorer` use:

- ``POST /v1/completions`` with ``prompt`` (a string or a list), ``max_tokens``, ``echo``, ``logprobs``,
  ``temperature``: ``max_tokens = 0`` with ``echo`` returns the prompt's per-token log-probabilities (the
  ``logprobs`` object: ``tokens``, ``token_logprobs``, ``text_offset``; the first token's log-prob is ``null``);
  ``max_tokens > 0`` generates (greedy at temperature 0, sampling otherwise);
- ``GET /v1/models``.

Safety: it binds to 127.0.0.1 unless told otherwise; with an API key (read from an environment variable, never
from the command line) every request needs ``Authorization: Bearer <key>``, compared in constant time; the key
is never logged (uvicorn's access log shows method, path and status only); requests are bounded (texts per
request, tokens per text, new tokens).
"""

from __future__ import annotations

import hmac
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from torch import nn

from leanfm.audit.victim import MAX_TEXTS_PER_REQUEST, echo_logprobs
from leanfm.errors import LeanfmError

MAX_NEW_TOKENS = 256
MAX_PROMPT_TOKENS = 2048


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (OpenAI's legacy completions; unknown fields are ignored)."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=0, le=MAX_NEW_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=0)  # top alternatives are not offered
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    seed: int | None = None


def create_app(model: nn.Module, tokenizer: Any, *, name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``model`` (one request at a time: the model is not thread-safe)."""
    app = FastAPI(title=f"leanfm serve {name}", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    model.eval()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request"}})

    @app.middleware("http")
    async def authorise(request: Request, call_next: Any) -> Any:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key")
        return await call_next(request)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "leanfm"}]}

    @app.post("/v1/completions")
    def completions(body: CompletionRequest) -> Any:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or len(texts) > MAX_TEXTS_PER_REQUEST:
            return error(400, f"prompt must hold 1..{MAX_TEXTS_PER_REQUEST} texts, got {len(texts)}")
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        if max(lengths) > MAX_PROMPT_TOKENS:
            return error(400, f"a prompt has {max(lengths)} tokens; at most {MAX_PROMPT_TOKENS}")
        if body.max_tokens == 0 and not body.echo:
            return error(400, "max_tokens = 0 returns nothing without echo = true")
        with lock:
            try:
                choices = _answer(model, tokenizer, texts, body.max_tokens, body.echo, body.logprobs is not None,
                                  body.temperature, body.seed)
            except LeanfmError as err:
                return error(400, str(err))
        prompt_tokens = sum(lengths)
        completion_tokens = sum(c.pop("_new_tokens") for c in choices)
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def _answer(model: nn.Module, tokenizer: Any, texts: list[str], max_tokens: int, echo: bool, logprobs: bool,
            temperature: float, seed: int | None) -> list[dict[str, Any]]:
    echoes = echo_logprobs(model, tokenizer, texts) if echo and logprobs else None
    choices = []
    for i, text in enumerate(texts):
        completion, new_tokens = ("", 0) if max_tokens == 0 else _generate(model, tokenizer, text, max_tokens,
                                                                        temperature, seed)
        choice: dict[str, Any] = {"index": i, "text": (text if echo else "") + completion,
                                  "finish_reason": "length", "logprobs": None, "_new_tokens": new_tokens}
        if echoes is not None:
            e = echoes[i]
            choice["logprobs"] = {"tokens": e.tokens, "token_logprobs": e.token_logprobs,
                                  "text_offset": e.text_offset, "top_logprobs": None}
        choices.append(choice)
    return choices


def _generate(model: nn.Module, tokenizer: Any, text: str, max_tokens: int, temperature: float,
              seed: int | None) -> tuple[str, int]:
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)  # type: ignore[operator]
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


def serve(model: nn.Module, tokenizer: Any, *, name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, name=name, api_key=api_key), host=host, port=port,
                log_level=log_level)
