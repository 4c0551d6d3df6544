"""Typed requests of the inference gateway, and the errors it answers for bad ones.

Every route validates its body with a pydantic model before anything reaches a
replica, so a malformed request gets a 4xx that names the field instead of a 500
(or, worse, a replica stuck on a request it should never have received). ``n`` and
``max_tokens`` are bounded by :class:`GatewayLimits` (``trainer.atropos.gateway_max_n``,
``trainer.atropos.gateway_max_tokens``): the models are built per gateway by
:func:`request_models`.

Error bodies take vLLM's OpenAI-server shape, ``{"error": {"message", "type",
"param", "code"}}``, which OpenAI clients already parse.
"""

# no ``from __future__ import annotations``: the bounded models below are built from local types

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

NonNegativeInt = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0)]


@dataclass(frozen=True)
class GatewayLimits:
    """What one request may ask of the replicas."""

    max_n: int = 64
    max_tokens: int = 16384
    # single-choice sub-requests in flight at once, gateway-wide, for requests asking for n > 1
    max_concurrency: int = 32

    def __post_init__(self):
        for name in ("max_n", "max_tokens", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.atropos.gateway_{name} must be >= 1, got {getattr(self, name)}")


class _Request(BaseModel):
    # strict: a logprobs of "3" or 1.5 is refused, not coerced; NaN and Infinity are never a sampling value
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    model: str | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_tokens: NonNegativeInt | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    # the gateway answers whole replies only
    stream: Literal[False] | None = None


class PromptTokenIds(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    prompt_token_ids: Annotated[list[TokenId], Field(min_length=1)]


class GenerateRequest(_Request):
    """Atropos's tokens-in ``POST /generate`` (atroposlib's ``server_type: vllm``)."""

    # atroposlib passes its own keyword arguments through; unknown ones are not sampling parameters
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    prompt: PromptTokenIds
    logprobs: NonNegativeInt | None = 0
    n: Annotated[int, Field(ge=1)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[Any] | None = None


class CompletionRequest(_Request):
    """OpenAI ``POST /v1/completions``; keys not named here pass through to the replica."""

    prompt: str | Annotated[list[TokenId], Field(min_length=1)] | list[str] | list[list[TokenId]]
    logprobs: NonNegativeInt | None = None
    n: Annotated[int, Field(ge=1)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None


class ChatCompletionRequest(_Request):
    """OpenAI ``POST /v1/chat/completions``; keys not named here pass through to the replica."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: NonNegativeInt | None = None
    n: Annotated[int, Field(ge=1)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


@dataclass(frozen=True)
class RequestModels:
    generate: type[GenerateRequest]
    completion: type[CompletionRequest]
    chat: type[ChatCompletionRequest]


def request_models(limits: GatewayLimits) -> RequestModels:
    """The request models with ``n`` and the token budget bounded by ``limits``."""
    choices = Annotated[int, Field(ge=1, le=limits.max_n)]
    tokens = Annotated[int, Field(ge=1, le=limits.max_tokens)] | None

    class BoundedGenerate(GenerateRequest):
        n: choices = 1
        max_tokens: tokens = None
        max_new_tokens: tokens = None

    class BoundedCompletion(CompletionRequest):
        n: choices = 1
        max_tokens: tokens = None

    class BoundedChat(ChatCompletionRequest):
        n: choices = 1
        max_tokens: tokens = None
        max_completion_tokens: tokens = None

    return RequestModels(generate=BoundedGenerate, completion=BoundedCompletion, chat=BoundedChat)


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    """An error in vLLM's OpenAI-server shape."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def unknown_model_response(name: str) -> JSONResponse:
    """What vLLM answers for a model name it does not serve."""
    return JSONResponse(error_body(404, f"The model `{name}` does not exist.", "NotFoundError", "model"), 404)


def _field(error: dict) -> tuple[str, str]:
    """The field an error is about, as a dotted path, and what was wrong with it."""
    loc, msg = tuple(error.get("loc", ())), error.get("msg", "")
    if error.get("type") == "json_invalid":
        # FastAPI's location of a JSON error is ("body", character position)
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return "body", f"not valid JSON{where}: {msg}"
    # FastAPI prefixes the body's fields with "body"; a bare ("body",) is the body itself
    parts = [str(part) for part in (loc[1:] if loc and loc[0] == "body" else loc)]
    return (".".join(parts) if parts else "body"), msg


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """HTTP 400 naming each field that failed validation (the replica never sees the request)."""
    content_type = request.headers.get("content-type", "")
    if content_type and content_type.split(";")[0].strip().lower() != "application/json":
        body = error_body(415, f"the body must be JSON sent as content-type application/json, got {content_type!r}",
                          "UnsupportedMediaType", "content-type")
        return JSONResponse(body, status_code=415)
    # the offending input is left out: it may be NaN, which JSON cannot carry
    detail = []
    for error in exc.errors():
        field, msg = _field(error)
        detail.append({"field": field, "msg": msg, "type": error.get("type", "")})
    message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail) or "invalid request"
    body = error_body(400, message, "BadRequestError", detail[0]["field"] if detail else None)
    return JSONResponse({**body, "detail": detail}, status_code=400)
