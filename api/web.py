"""A route table that feeds both Flask and /openapi.json, and the request helpers every
handler uses: who is asking, the validated body and query, the schema-dumped response."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from flask import Flask, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import Schema, ValidationError

from api.auth import Principal
from api.errors import BadRequest, TooLarge, Unprocessable
from api.services import Services


@dataclass(frozen=True)
class Route:
    rule: str
    method: str
    handler: Callable[..., ResponseReturnValue]
    summary: str
    tag: str
    body: type[Schema] | None = None
    query: type[Schema] | None = None
    response: type[Schema] | None = None
    status: int = 200
    auth: bool = True
    errors: tuple[int, ...] = field(default=(400, 401, 403, 404, 422))
    raw_body: str | None = None
    raw_response: str | None = None
    documented: bool = True
    websocket: bool = False
    """Also served to WebSocket handshakes (werkzeug routes them apart from plain GETs)."""
    revocation_later: bool = False
    """The handler sees to it that nothing a revoked token sends takes effect (heartbeats:
    per batch, api/heartbeats.py), so the caller's stream is not read per request."""


ROUTES: list[Route] = []
JSON_LIMIT = 1 << 20
"""Largest JSON request body (bundles have their own, larger limit)."""


def route(rule: str, method: str = "GET", **kw: Any) -> Callable:
    """Declare an endpoint: its Flask rule and the schemas /openapi.json documents."""
    def register(fn: Callable[..., ResponseReturnValue]) -> Callable[..., ResponseReturnValue]:
        summary = " ".join((fn.__doc__ or fn.__name__).strip().split("\n\n")[0].split())
        ROUTES.append(Route(rule, method, fn, summary, **kw))
        return fn
    return register


def install(app: Flask) -> None:
    for r in ROUTES:
        app.add_url_rule(r.rule, f"{r.method} {r.rule}", _wrap(r), methods=[r.method])
        if r.websocket:
            app.add_url_rule(r.rule, f"WS {r.rule}", _wrap(r), methods=[r.method],
                             websocket=True)


def _wrap(r: Route) -> Callable[..., ResponseReturnValue]:
    def view(**kwargs: Any) -> ResponseReturnValue:
        if r.auth:
            g.who = services().authenticate(request.headers.get("Authorization"),
                                            revocation=not r.revocation_later)
        refuse_bad_text(kwargs)
        return r.handler(**kwargs)
    view.__name__ = r.handler.__name__
    return view


@cache
def _schema(cls: type[Schema]) -> Schema:
    """One instance per schema class: building one costs more than using it."""
    return cls()


def services() -> Services:
    return current_app.extensions["tally"]


def who() -> Principal:
    return g.who


def json_body() -> Any:
    """The parsed JSON body (parsed once per request), None if it is not JSON."""
    if "json_body" not in g:
        g.json_body = _json_body()
    return g.json_body


def body(schema: type[Schema]) -> dict[str, Any]:
    """The JSON body validated by `schema`: 400 if it is not JSON, 422 naming the fields."""
    data = json_body()
    if data is None:
        raise BadRequest("the request body must be JSON (Content-Type: application/json)",
                         {"body": ["not JSON"]})
    return load(schema, data)


def _json_body() -> Any:
    """The parsed JSON body, or None if it is not JSON; TooLarge past JSON_LIMIT bytes,
    read no further than that even when the body has no Content-Length (chunked)."""
    if (request.content_length or 0) > JSON_LIMIT:
        raise TooLarge(f"a JSON body may be {JSON_LIMIT} bytes at most")
    if not request.is_json:
        return None
    chunks, size = [], 0
    while size <= JSON_LIMIT:
        chunk = request.stream.read(min(1 << 16, JSON_LIMIT + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > JSON_LIMIT:
        raise TooLarge(f"a JSON body may be {JSON_LIMIT} bytes at most")
    try:
        return current_app.json.loads(b"".join(chunks))
    except ValueError:
        return None


def query(schema: type[Schema]) -> dict[str, Any]:
    """Query-string parameters validated by `schema` (lists from repeated keys)."""
    s = _schema(schema)
    data: dict[str, Any] = {}
    for key in request.args:
        f = s.fields.get(key)
        many = f is not None and f.__class__.__name__ == "List"
        data[key] = request.args.getlist(key) if many else request.args.get(key)
    return load(schema, data)


BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
"""A NUL (PostgreSQL text and jsonb refuse it) or a lone surrogate (not UTF-8 at all)."""


def bad_text(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path to the first string or key holding BAD_TEXT, or None."""
    if isinstance(value, str):
        return path if BAD_TEXT.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            found = bad_text(k, (*path, str(k))) or bad_text(v, (*path, str(k)))
            if found is not None:
                return tuple(BAD_TEXT.sub("?", p) for p in found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = bad_text(v, (*path, str(i)))
            if found is not None:
                return found
    return None


def refuse_bad_text(data: Any) -> None:
    """422 naming the field, before anything is stored: such text would fail the append
    (a 500, after a bundle was already kept) or reach a log, a header, a file name."""
    found = bad_text(data)
    if found:
        raise Unprocessable(f"invalid {'.'.join(found)}: NUL bytes and lone surrogates are "
                            "not allowed", {found[0]: ["NUL or lone surrogate"]})


def load(schema: type[Schema], data: Any) -> dict[str, Any]:
    refuse_bad_text(data)
    try:
        return _schema(schema).load(data)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_": exc.messages}
        first = next(iter(messages.items()))
        raise Unprocessable(f"invalid {first[0]}: {_flat(first[1])}", messages) from exc


def _flat(v: Any) -> str:
    while isinstance(v, dict | list) and v:
        v = next(iter(v.values())) if isinstance(v, dict) else v[0]
    return str(v)


def reply(schema: type[Schema], obj: Any, status: int = 200) -> ResponseReturnValue:
    return jsonify(_schema(schema).dump(obj)), status


def openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)
