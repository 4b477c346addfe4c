"""Apps' Unix user names: one app, one name, never another app's."""

import hashlib
import re

from agents.users import user_name
from ledger.catalogue import APP_NAME


def test_a_short_app_name_cannot_take_a_long_names_user() -> None:
    """The review's case: with `<18>-<7 hex>` as the long form, the 26-character app name
    `payments-service-p-e474b90` was itself valid and got the same user."""
    victim = "payments-service-production-eu"
    attacker_form = f"{victim[:18]}-{hashlib.sha256(victim.encode()).hexdigest()[:7]}"
    APP_NAME(attacker_form)  # a name the API accepts
    assert user_name(attacker_form) != user_name(victim)


def test_names_fit_linux_and_long_ones_cannot_be_spelled_by_an_app() -> None:
    for app in ("ab", "a" * 26, "a" * 27, "payments-service-production-eu", "z" * 30):
        name = user_name(app)
        assert len(name) <= 32 and re.fullmatch(r"[a-z_][a-z0-9_-]*", name)
        if len(f"tally-{app}") > 32:
            assert "_" in name  # no app name holds `_`
    assert user_name("a" * 29 + "b") != user_name("a" * 29 + "c")
