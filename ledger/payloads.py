"""What is done with an event's payload, by type: checked on append (a short path for the
plainly valid common case, marshmallow for everything else and every message), redacted
for people, brought to the current schema version on read. The types themselves and their
schemas are the catalogue (ledger/catalogue.py)."""

from __future__ import annotations

import math
from typing import Any

from marshmallow import ValidationError, fields, missing

from ledger.catalogue import CATALOGUE, EventType
from ledger.errors import InvalidEvent


def event_type(name: str) -> EventType:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise InvalidEvent(
            f"unknown event type {name!r}", {"_type": [f"unknown event type {name!r}"]}
        ) from None


def validate_event(stream_cat: str, type_name: str, data: Any) -> dict[str, Any]:
    """Refuse an unknown type, a payload that does not match its schema, or an event
    appended to a stream of the wrong category. Errors name the field.

    Returns the payload to store: complete (defaults filled in) and in canonical JSON
    types, whichever path checked it."""
    et = event_type(type_name)
    fast = plain_payload(et, stream_cat, data)
    if fast is not None:
        return fast
    if et.category != stream_cat:
        raise InvalidEvent(
            f"{type_name} belongs in a {et.category}-* stream, not a {stream_cat}-* stream",
            {"_stream": [f"must be a {et.category}-* stream"]},
        )
    if not isinstance(data, dict):
        raise InvalidEvent(f"{type_name} payload must be an object", {"_data": ["not an object"]})
    try:
        return et.schema.dump(et.schema.load(data))
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_data": exc.messages}
        detail = "; ".join(f"{k}: {_first(v)}" for k, v in messages.items())
        raise InvalidEvent(f"invalid {type_name}: {detail}", messages) from exc


_EXACT_TYPES: dict[type, tuple[type, ...]] = {
    fields.String: (str,), fields.Integer: (int,), fields.Boolean: (bool,),
    fields.Float: (int, float),
}


def plain_payload(et: EventType, stream_cat: str, data: Any) -> dict[str, Any] | None:
    """The payload to store, defaults filled in, if it plainly belongs in this stream
    category and is valid; else None, and validate_event gives the verdict and the message.

    Appends are hot and a full marshmallow load costs several times the rest of an append's
    client work, so this checks the common case (exact JSON types, then the fields' own
    validators) only. It only ever says "valid" for what marshmallow accepts too; anything
    else (a coercible "5" for an Int, nested fields that fail, any error) goes to
    marshmallow."""
    if et.category != stream_cat or type(data) is not dict:
        return None
    load_fields = et.schema.load_fields
    if not data.keys() <= load_fields.keys():
        return None
    out = data
    for name, fld in load_fields.items():
        if name not in data:
            if fld.required:
                return None
            default = fld.load_default
            if default is not missing:
                if out is data:
                    out = dict(data)
                out[name] = default() if callable(default) else default
            continue
        value = data[name]
        if value is None:
            if fld.allow_none:
                continue
            return None
        exact = _EXACT_TYPES.get(type(fld))
        try:
            if exact is None:
                if fld.deserialize(value) != value:  # coerced: let marshmallow canonicalise
                    return None
            elif type(value) not in exact or (
                    exact[-1] is float and not math.isfinite(value)):
                return None
            for check in fld.validators:
                if check(value) is False:
                    return None
        except ValidationError:
            return None
    return out


def _first(messages: Any) -> str:
    if isinstance(messages, list) and messages:
        return str(messages[0])
    if isinstance(messages, dict) and messages:
        return _first(next(iter(messages.values())))
    return str(messages)


REDACTED = "<redacted>"


def redacted(type_name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The payload as shown to people by default: values of fields marked
    `metadata={"secret": True}` hidden (a mapping keeps its keys), everything else as is.
    Every reader that prints events (API, CLI) goes through here."""
    et = CATALOGUE.get(type_name)
    if et is None:
        return data
    secret = [n for n, f in et.schema.fields.items() if f.metadata.get("secret") and n in data]
    if not secret:
        return data
    out = dict(data)
    for name in secret:
        value = data[name]
        out[name] = ({k: REDACTED for k in value} if isinstance(value, dict) else REDACTED)
    return out


def upcast(type_name: str, data: dict[str, Any], stored_version: int) -> dict[str, Any]:
    """Bring a stored payload to the current schema version of its type."""
    et = CATALOGUE.get(type_name)
    if et is None:
        return data
    for v in range(stored_version, et.version):
        data = et.upcasters[v](data)
    return data
