"""The event catalogue, without PostgreSQL: validation names fields, upcasting works."""

import pytest

from ledger import catalogue
from ledger.catalogue import stream_category
from ledger.errors import InvalidEvent
from ledger.payloads import upcast, validate_event


def test_stream_ids_have_a_category() -> None:
    assert stream_category("app-my-blog") == "app"
    assert stream_category("instance-0f3a:web.1") == "instance"
    for bad in ("app", "-blog", "App-blog", "app-", "app blog", "x" * 300 + "-a"):
        with pytest.raises(InvalidEvent, match="category-id"):
            stream_category(bad)


def test_valid_event_passes() -> None:
    validate_event("app", "AppCreated", {"name": "blog", "owner": "ann"})


def test_unknown_type_is_named() -> None:
    with pytest.raises(InvalidEvent) as err:
        validate_event("app", "AppTeleported", {})
    assert "AppTeleported" in str(err.value) and "_type" in err.value.fields


def test_missing_and_bad_fields_are_named() -> None:
    with pytest.raises(InvalidEvent) as err:
        validate_event("app", "AppCreated", {"name": "Bad_Name!"})
    assert set(err.value.fields) == {"name", "owner"}
    assert "name" in str(err.value)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(InvalidEvent) as err:
        validate_event("app", "ScaleChanged", {"app": "blog", "scale": {"web": 1}, "x": 1})
    assert "x" in err.value.fields


def test_nested_values_are_checked() -> None:
    with pytest.raises(InvalidEvent):
        validate_event("app", "ScaleChanged", {"app": "blog", "scale": {"web": -1}})
    with pytest.raises(InvalidEvent):
        validate_event("app", "ScaleChanged", {"app": "blog", "scale": {"Web!": 1}})


def test_event_must_go_to_its_category() -> None:
    with pytest.raises(InvalidEvent, match="app-\\* stream"):
        validate_event("host", "AppCreated", {"name": "blog", "owner": "ann"})


def test_payload_must_be_an_object() -> None:
    with pytest.raises(InvalidEvent, match="object"):
        validate_event("app", "AppCreated", ["blog"])


def test_every_type_has_a_story() -> None:
    for et in catalogue.CATALOGUE.values():
        assert et.doc, f"{et.name} has no docstring"
        assert et.category.isidentifier()


def test_upcast_applies_each_step(monkeypatch: pytest.MonkeyPatch) -> None:
    et = catalogue.CATALOGUE["HostLost"]
    monkeypatch.setitem(catalogue.CATALOGUE, "HostLost", type(et)(
        et.name, et.category, et.schema, et.doc, version=3,
        upcasters={1: lambda d: {**d, "reason": d.get("why", "")},
                   2: lambda d: {k: v for k, v in d.items() if k != "why"}}))
    assert upcast("HostLost", {"host_id": "h1", "why": "gone"}, 1) == {
        "host_id": "h1", "reason": "gone"}
    assert upcast("HostLost", {"host_id": "h1", "reason": "x"}, 3) == {
        "host_id": "h1", "reason": "x"}


def test_stored_payload_is_complete_and_canonical() -> None:
    assert validate_event("heartbeat", "HostHeartbeat", {"host_id": "h"}) == {
        "host_id": "h", "load": 0.0, "memory_used_mb": 0, "memory_total_mb": 0,
        "instances": 0}
    # Coercible values are accepted (as marshmallow does) and stored canonically.
    assert validate_event("app", "ScaleChanged", {"app": "blog", "scale": {"web": "2"}}) == {
        "app": "blog", "scale": {"web": 2}}
    assert validate_event("heartbeat", "HostHeartbeat", {"host_id": "h", "instances": "3"})[
        "instances"] == 3


@pytest.mark.parametrize("bad", [
    {"host_id": "h", "load": float("nan")},
    {"host_id": "h", "instances": True},
    {"host_id": "h", "instances": -1},
    {"host_id": None},
    {"host_id": 5},
])
def test_fast_path_never_accepts_what_marshmallow_refuses(bad: dict) -> None:
    with pytest.raises(InvalidEvent):
        validate_event("heartbeat", "HostHeartbeat", bad)


def test_secret_values_are_redacted_for_people() -> None:
    from ledger.payloads import REDACTED, redacted

    data = {"app": "blog", "set": {"DB_PASSWORD": "hunter2"}, "unset": ["OLD"],
            "config_version": 3}
    shown = redacted("ConfigChanged", data)
    assert shown["set"] == {"DB_PASSWORD": REDACTED} and shown["unset"] == ["OLD"]
    assert data["set"]["DB_PASSWORD"] == "hunter2"  # the stored value is untouched
    assert redacted("AppCreated", {"name": "blog", "owner": "a"}) == {"name": "blog",
                                                                       "owner": "a"}


@pytest.mark.parametrize(("category", "type_", "data"), [
    ("app", "AppCreated", {"name": "blog\n", "owner": "ann"}),
    ("user", "UserCreated", {"name": "ann\n", "role": "member"}),
    ("app", "ScaleChanged", {"app": "blog", "scale": {"web\n": 1}}),
    ("app", "ConfigChanged", {"app": "blog", "set": {"KEY\n": "v"}, "config_version": 1}),
])
def test_a_trailing_newline_is_not_a_name(category: str, type_: str, data: dict) -> None:
    with pytest.raises(InvalidEvent):
        validate_event(category, type_, data)


def test_a_stream_id_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        stream_category("app-blog\n")
