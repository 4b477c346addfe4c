"""/openapi.json, generated from the route table and its marshmallow schemas (apispec)."""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from api import schemas
from api.web import ROUTES, Route, openapi_path

REASONS = {400: "Bad request", 401: "No or unknown token", 403: "Not allowed",
           404: "Not found", 409: "Conflict (carries the current state)",
           413: "Too large", 422: "Invalid input", 503: "Unavailable now (try again)"}
APP = r"^[a-z][a-z0-9-]{1,28}[a-z0-9]$"
RAW = {"text/event-stream": {
    "type": "object", "required": ["data"], "description": "one server-sent event",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                   "id": {"type": "string"}, "retry": {"type": "integer"}}}}
"""A raw answer's schema where it is not plain bytes: a text/event-stream is described event
by event (OpenAPI before 3.2 has a stream's `schema` describe each of its events)."""


def spec() -> dict[str, Any]:
    s = APISpec(title="tally", version="1", openapi_version="3.0.3",
                plugins=[MarshmallowPlugin()],
                info={"description": "Deploy and run Python web apps on a tally fleet."})
    s.components.security_scheme("token", {"type": "http", "scheme": "bearer"})
    s.components.schema("Error", schema=schemas.Error)
    paths: dict[str, dict[str, Any]] = {}
    documented = [r for r in ROUTES if r.documented]
    for r in documented:
        paths.setdefault(openapi_path(r.rule), {})[r.method.lower()] = _operation(r)
    for r in documented:
        if r.method in ("POST", "PUT") and (links := _links(r, documented)):
            paths[openapi_path(r.rule)][r.method.lower()]["responses"][str(r.status)][
                "links"] = links
    for path, operations in paths.items():
        s.path(path=path, operations=operations)
    return s.to_dict()


def _operation(r: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": r.summary, "tags": [r.tag],
                          "operationId": r.handler.__name__,
                          "parameters": _path_params(r.rule), "responses": {}}
    if r.auth:
        op["security"] = [{"token": []}]
    if r.query:
        op["parameters"].append({"in": "query", "schema": r.query})
    if r.body:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": r.body}}}
    if r.raw_body:
        op["requestBody"] = {"required": True, "content": {
            r.raw_body: {"schema": {"type": "string", "format": "binary"}}}}
    ok: dict[str, Any] = {"description": "OK"}
    if r.response:
        ok["content"] = {"application/json": {"schema": r.response}}
    if r.raw_response:  # instead of JSON, or beside it (a stream asked for in the query)
        ok.setdefault("content", {})[r.raw_response] = {"schema": RAW.get(
            r.raw_response, {"type": "string", "format": "binary"})}
    op["responses"][str(r.status)] = ok
    # Any request may meet a ledger that is away (a failover, a statement cut short): 503.
    codes = sorted({*r.errors, 503, *((413,) if r.body else ())})
    for code in codes:
        op["responses"][str(code)] = {"description": REASONS[code], "content": {
            "application/json": {"schema": "Error"}}}
    op["responses"]["414"] = {"description": "Request line too long (refused by gunicorn)"}
    return op


def _links(origin: Route, routes: list[Route]) -> dict[str, Any]:
    """OpenAPI links from what a create or update answers to the operations on what it
    made (POST /apps -> everything under /apps/{name}): a client, or a stateful test,
    follows them. A parameter comes from the origin's own path, or else from a field of
    its answer of the same name."""
    fields = getattr(origin.response, "_declared_fields", {}) if origin.response else {}
    answered, mine = set(fields), set(_names(origin.rule))
    base = openapi_path(origin.rule)
    links: dict[str, Any] = {}
    for r in routes:
        path = openapi_path(r.rule)
        if r is origin or not path.startswith(base + "/"):
            continue
        params = {}
        for name in _names(r.rule):
            if name in mine:
                params[name] = f"$request.path.{name}"
            elif name in answered:
                params[name] = f"$response.body#/{name}"
            else:
                break
        else:
            links[r.handler.__name__] = {"operationId": r.handler.__name__,
                                         "parameters": params}
    return links


def _names(rule: str) -> list[str]:
    return [name for _, name in re.findall(r"<(?:([a-z]+):)?([a-z_]+)>", rule)]


def _path_params(rule: str) -> list[dict[str, Any]]:
    out = []
    for conv, name in re.findall(r"<(?:([a-z]+):)?([a-z_]+)>", rule):
        schema: dict[str, Any] = {"type": "string"}
        if conv == "int":
            schema = {"type": "integer", "minimum": 0}
        elif name == "name" and rule.startswith("/apps/"):
            schema["pattern"] = APP
        out.append({"in": "path", "name": name, "required": True, "schema": schema})
    return out
