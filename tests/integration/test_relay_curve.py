"""CURVE on the relays' PUB: the control plane's key and keys hosts registered are woken;
a subscriber with no key, or with a key nobody registered, hears nothing."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from ledger import Ledger, NewEvent, curve
from ledger.cluster import Cluster
from ledger.relay import Relay
from ledger.subscriber import Subscriber
from tests.conftest import free_ports
from tests.waiting import wait_until


@pytest.fixture
def relay(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[str, curve.Keypair, curve.Keypair]]:
    """A relay serving CURVE on a free port: (endpoint, its keypair, the control keypair)."""
    context = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    own, control = (curve.load_or_create(tmp_path / "relay.curve"),
                    curve.load_or_create(tmp_path / "control.curve"))
    r = Relay(cluster.dsn(), endpoint, poll_interval=0.2, leader_lock=uuid.uuid4().int % 2**40,
              context=context, curve=(own, curve.Allowed({control.public}, cluster.dsn(),
                                                               refresh_s=0.2)))
    thread = threading.Thread(target=r.run, daemon=True)
    thread.start()
    yield endpoint, own, control
    r.stop.set()
    thread.join(10)
    context.destroy(linger=0)


def _woken(sub: Subscriber, ledger: Ledger, seconds: float) -> bool:
    """Whether the subscriber hears of a fresh append within `seconds`."""
    ledger.append("heartbeat-curve-probe", [NewEvent("HostHeartbeat", {"host_id": "probe"})])
    target = ledger.sequence()
    return wait_until(lambda: sub.wait(0.1) is not None and sub.head >= target or None,
                      seconds, "woken") if seconds else False


def _hears(sub: Subscriber, ledger: Ledger, seconds: float) -> bool:
    try:
        return _woken(sub, ledger, seconds)
    except AssertionError:
        return False


def test_only_known_keys_are_woken(relay: tuple[str, curve.Keypair, curve.Keypair],
                                   cluster: Cluster, tmp_path: Path) -> None:
    endpoint, own, control = relay
    context = zmq.Context()
    plain = Subscriber([endpoint], context=context)
    stranger_keys = curve.load_or_create(tmp_path / "stranger.curve")
    stranger = Subscriber([endpoint], context=context,
                          curve=curve.Client(own.public, stranger_keys))
    plane = Subscriber([endpoint], context=context, curve=curve.Client(own.public, control))
    host_keys = curve.load_or_create(tmp_path / "host.curve")
    host = Subscriber([endpoint], context=context,
                      curve=curve.Client(own.public, host_keys), resubscribe_s=1.0)
    try:
        with Ledger(cluster.dsn()) as ledger:
            assert _hears(plane, ledger, 20), "the control plane's key is admitted"
            assert not _hears(plain, ledger, 2), "a subscriber without CURVE heard a wake-up"
            assert not _hears(stranger, ledger, 2), "an unregistered key heard a wake-up"
            assert not _hears(host, ledger, 1), "not registered yet"
            hid = f"hc-{uuid.uuid4().hex[:6]}"
            ledger.append(f"host-{hid}", [NewEvent("HostRegistered", {
                "host_id": hid, "address": "10.0.0.5", "port_min": 1, "port_max": 2,
                "capacity": 1, "public_key": host_keys.public.decode()})])
            ledger.sequence()
            assert _hears(host, ledger, 20), "a registered host's key is admitted"
            assert not _hears(stranger, ledger, 2), "still not the stranger"
    finally:
        for s in (plain, stranger, plane, host):
            s.close()
        context.destroy(linger=0)
