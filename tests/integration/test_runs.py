"""One-off runs through the API: `tally run` from a machine that has only the API's URL and
a token, the API's ticket the only way to make an agent run anything, RunStarted/RunEnded
in the ledger, pipes and ptys, detached runs. The attacks are made as an app's process
would make them: a plain process on the host speaking ZMTP to the agent's run socket."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import zmq

from api.auth import create_user
from ledger import Ledger, NewEvent, curve
from ledger.cluster import Cluster
from ledger.tickets import SILENCE_S, Ticket, channel_seed, host_key, new_key, sign
from tests.api_process import ApiProcess
from tests.conftest import destroy_cluster, free_port_range, free_ports, make_cluster, tally_env
from tests.fixtures.apps.fleet import AgentProc, Daemon, create_app, release, run_key
from tests.waiting import Lines, wait_until

PROBE = ("import os, sys; print('tty', os.isatty(1), 'uid', os.getuid(), 'greeting', "
         "os.environ['GREETING'], 'cwd-has-procfile', os.path.exists('Procfile')); sys.exit(7)")
LIMITS = ("import resource as r; print(*r.getrlimit(r.RLIMIT_NOFILE), "
          "r.getrlimit(r.RLIMIT_AS)[0], *r.getrlimit(r.RLIMIT_CORE))")
APP = "oneoff"


@dataclass
class Platform:
    cluster: Cluster
    api: ApiProcess
    agent: AgentProc
    key: bytes
    tokens: dict[str, str]
    home: Path
    """A developer's machine: a HOME of its own, and nothing of TALLY_HOME."""

    def env(self, who: str = "ann", api: str | None = None) -> dict[str, str]:
        """Only the API's URL and a token: no TALLY_HOME, no ledger ports."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env.update(HOME=str(self.home), TALLY_API=api or self.api.url)
        if who:
            env["TALLY_TOKEN"] = self.tokens[who]
        return env

    def tally(self, *args: str, who: str = "ann", stdin: str | None = None,
              timeout: float = 120, api: str | None = None
              ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=self.env(who, api),
                              capture_output=True, text=True, timeout=timeout,
                              input=stdin, stdin=None if stdin is not None else
                              subprocess.DEVNULL, cwd=self.home)

    def endpoint(self) -> str:
        return str(self.registered()["run_endpoint"])

    def registered(self) -> dict:
        """The agent's last registration: its run socket and CURVE public key."""
        with Ledger(self.cluster.dsn()) as ledger:
            return [e for e in ledger.read_stream(f"host-{self.agent.host_id}")
                    if e.type == "HostRegistered"][-1].data

    def as_api(self) -> curve.Client:
        """The run channel's keys as the API holds them: the only client the agent admits.
        The tests below use them to show that a ticket is still needed; an attacker on the
        host has no such keys (test_only_the_api_may_speak_to_the_run_socket)."""
        return curve.Client(self.registered()["public_key"].encode(),
                            curve.from_seed(channel_seed(self.key)))

    def events(self, *types: str) -> list:
        with Ledger(self.cluster.dsn()) as ledger:
            return [e for e in ledger.read_stream(f"app-{APP}") if e.type in types]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    cluster = make_cluster()
    key = run_key(cluster)  # the API's alone: the agent gets hr's own when it registers
    collector = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    low, _ = free_port_range(5)
    daemons = [Daemon(cluster, "projectors", ["projectors", "--poll-interval", "0.2"]),
               Daemon(cluster, "collector", ["collector"], TALLY_COLLECTOR=collector)]
    agent = AgentProc(cluster, "hr", (low, low + 4), collector=collector)
    api = ApiProcess(tally_env(cluster, TALLY_RUN_KEY=key.hex(), TALLY_COLLECTOR=collector),
                     free_ports(1)[0])
    try:
        for d in (*daemons, agent):
            d.start()
        api.wait_ready()
        with Ledger(cluster.dsn()) as ledger:
            tokens = {name: create_user(ledger, name, role, host)
                      for name, role, host in (("ann", "member", None), ("bob", "member", None),
                                               ("root", "admin", None),
                                               ("agent-hr", "agent", "hr"))}
            create_app(ledger, APP, {"GREETING": "salut"})
            ledger.append("app-bobs", [NewEvent("AppCreated", {"name": "bobs", "owner": "bob"}),
                                       NewEvent("ConfigChanged", {"app": "bobs", "set": {
                                           "SECRET": "bob's"}, "config_version": 1})])
            release(ledger, cluster.root.parent, APP, "migrating", 1, config_version=1)
        yield Platform(cluster, api, agent, key, tokens, tmp_path_factory.mktemp("laptop"))
    finally:
        api.stop()
        for d in (agent, *daemons):
            d.kill()
        agent.kill_apps()
        destroy_cluster(cluster)


def _ready(p: Platform) -> None:
    """Until the views know the agent's host alive (the API picks hosts from them)."""
    last: list[subprocess.CompletedProcess[str]] = []

    def ran() -> bool:
        last[:] = [p.tally("run", "-a", APP, "--", "true")]
        return last[0].returncode == 0
    with contextlib.suppress(AssertionError):
        wait_until(ran, 120, "a first run")
        return
    raise AssertionError(f"no first run in 120 s; the last said {last[0].stderr!r}")


# --- attacks on the agent's run socket -------------------------------------------------------


def _ask(endpoint: str, kind: bytes, body: dict, timeout: float = 30,
         keys: curve.Client | None = None) -> tuple[bytes, bytes]:
    """Speak ZMTP to the agent's run socket (with `keys`, as a CURVE client); the first
    answer that is not a keep-alive."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        curve.as_client(sock, keys)
    sock.connect(endpoint)
    try:
        sock.send_multipart([kind, json.dumps(body).encode()])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.poll(200):
                got = sock.recv_multipart()
                if got[0] not in (b"alive", b"out"):
                    return got[0], got[1]
        raise AssertionError("the agent said nothing")
    finally:
        sock.close()


def _ticket(p: Platform, app: str = APP, **changes: object) -> Ticket:
    now = time.time()
    t = Ticket(kind="run", run_id=uuid.uuid4().hex, app=app, number=999, release=1,
               argv=("true",), actor="mallory", host="hr", issued=now, expires=now + 30)
    return replace(t, **changes)


def test_only_the_api_may_speak_to_the_run_socket(platform: Platform) -> None:
    """The run socket is a CURVE server admitting only the API's key: a plain ZMTP peer, or
    one with a keypair of its own (even knowing the host's registered public key), gets no
    session at all, so not even a refusal. (The terminal's bytes are encrypted too.)"""
    p = platform
    _ready(p)
    endpoint = p.endpoint()
    stranger = curve.Client(p.registered()["public_key"].encode(),
                            curve.from_seed(new_key()))
    for keys in (None, stranger):
        with pytest.raises(AssertionError, match="said nothing"):
            _ask(endpoint, b"run", {"app": "bobs", "argv": ["id"]}, timeout=5, keys=keys)
    kind, why = _ask(endpoint, b"run", {"app": "bobs", "argv": ["id"]}, keys=p.as_api())
    assert kind == b"error" and b"no ticket" in why  # the API's key is heard


def test_an_attacker_on_the_host_runs_nothing_without_a_valid_ticket(
        platform: Platform, tmp_path: Path) -> None:
    """Even with the API's channel keys (the wall above gone), a ticket is the second."""
    p = platform
    _ready(p)
    marker = tmp_path / "pwned"
    tmp_path.chmod(0o777)
    argv = ["sh", "-c", f"touch {marker}; echo $SECRET"]
    endpoint, keys = p.endpoint(), p.as_api()
    # Yesterday's request, no ticket at all:
    kind, why = _ask(endpoint, b"run", {"app": "bobs", "argv": argv}, keys=keys)
    assert kind == b"error" and b"no ticket" in why
    # A ticket signed with a key of the attacker's own:
    forged = sign(new_key(), _ticket(p, "bobs", argv=tuple(argv)))
    kind, why = _ask(endpoint, b"run", {"ticket": forged}, keys=keys)
    assert kind == b"error" and b"signature" in why
    # A stop of someone's run, and garbage:
    assert _ask(endpoint, b"stop", {"ticket": "x.y"}, keys=keys)[0] == b"error"
    assert _ask(endpoint, b"run", {"ticket": 5}, keys=keys)[0] == b"error"
    assert not marker.exists()


def test_tickets_replayed_expired_for_another_app_or_host_are_refused(
        platform: Platform, tmp_path: Path) -> None:
    import requests

    p = platform
    _ready(p)
    # Tickets made here, not by the API: a run the API knows of (posted, never attached)
    # keeps the app's release in the agent's desired state, as a real run's RunStarted does.
    held = requests.post(f"{p.api.url}/apps/{APP}/runs", json={"command": ["true"]},
                         headers={"Authorization": f"Bearer {p.tokens['ann']}"}, timeout=30)
    assert held.status_code == 201, held.text
    endpoint, keys = p.endpoint(), p.as_api()
    hr = host_key(p.key, "hr")  # what the API signs hr's tickets with
    good = sign(hr, _ticket(p))
    assert _ask(endpoint, b"run", {"ticket": good}, keys=keys) == (b"exit", b"0")
    kind, why = _ask(endpoint, b"run", {"ticket": good}, keys=keys)  # replayed
    assert kind == b"error" and b"already used" in why
    expired = sign(hr, _ticket(p, issued=time.time() - 60, expires=time.time() - 30))
    kind, why = _ask(endpoint, b"run", {"ticket": expired}, keys=keys)
    assert kind == b"error" and b"expired" in why
    elsewhere = sign(hr, _ticket(p, host="h9"))
    kind, why = _ask(endpoint, b"run", {"ticket": elsewhere}, keys=keys)
    assert kind == b"error" and b"host h9" in why
    # A good ticket of app oneoff, its body edited to say app bobs (the MAC kept):
    body, mac = sign(hr, _ticket(p)).rsplit(".", 1)
    data = json.loads(base64.urlsafe_b64decode(body))
    data["app"] = "bobs"
    edited = base64.urlsafe_b64encode(json.dumps(data).encode()).decode() + "." + mac
    kind, why = _ask(endpoint, b"run", {"ticket": edited}, keys=keys)
    assert kind == b"error" and b"signature" in why
    stop_as_run = sign(hr, _ticket(p, kind="stop"))
    kind, why = _ask(endpoint, b"run", {"ticket": stop_as_run}, keys=keys)
    assert kind == b"error" and b"does not allow" in why


def test_a_host_signs_tickets_for_no_other_host(platform: Platform) -> None:
    """Each agent knows only its own host's key, handed by the API when it registers: a
    host taken over (its agent token and key stolen) cannot make another host run
    anything."""
    import requests

    p = platform
    _ready(p)
    with Ledger(p.cluster.dsn()) as ledger:
        theirs = create_user(ledger, f"agent-ha-{uuid.uuid4().hex[:6]}", "agent", "ha")
    headers = {"Authorization": f"Bearer {theirs}"}
    # A host with no run socket and no room: the API will send it no run.
    answer = requests.put(f"{p.api.url}/hosts/ha", headers=headers, timeout=30, json={
        "address": "127.0.0.1", "port_min": 1024, "port_max": 1025, "capacity": 0})
    assert answer.status_code == 200, answer.text
    stolen = bytes.fromhex(answer.json()["run_key"])
    assert stolen not in (p.key, host_key(p.key, "hr")) and stolen == host_key(p.key, "ha")
    refused = requests.put(f"{p.api.url}/hosts/hr", headers=headers, timeout=30, json={})
    assert refused.status_code == 403  # its token gets no other host's key
    forged = sign(stolen, _ticket(p, argv=("id",)))  # for host hr
    kind, why = _ask(p.endpoint(), b"run", {"ticket": forged}, keys=p.as_api())
    assert kind == b"error" and b"signature" in why
    kind, why = _ask(p.endpoint(), b"run", {"ticket": sign(p.key, _ticket(p))},
                     keys=p.as_api())
    assert kind == b"error" and b"signature" in why  # nor the platform's key: hr's own only


# --- runs through the API --------------------------------------------------------------------


def test_a_run_from_another_machine_streams_output_and_exit_code_and_is_recorded(
        platform: Platform) -> None:
    p = platform
    _ready(p)
    out = p.tally("run", "-a", APP, "--tty", "--", "python", "-c", PROBE)
    assert out.returncode == 7, out.stderr
    words = out.stdout.split()
    assert words[words.index("tty") + 1] == "True"
    assert words[words.index("greeting") + 1] == "salut"
    assert words[words.index("cwd-has-procfile") + 1] == "True"
    assert int(words[words.index("uid") + 1]) != 0
    migrate = p.tally("run", "-a", APP, "--", "python", "release.py")
    assert migrate.returncode == 0 and "migrated" in migrate.stdout
    limits = p.tally("run", APP, "--", "python", "-c", LIMITS)
    assert limits.stdout.split() == ["4096", "4096", str(1024 * 2**20), "0", "0"], limits.stdout
    plain = p.tally("run", APP, "--", "python", "-c", PROBE)  # stdin not a terminal: pipes
    assert plain.returncode == 7 and "tty False" in plain.stdout, plain.stderr
    started = [e for e in p.events("RunStarted") if e.data["command"][-1] == PROBE]
    assert started and all(e.metadata["actor"] == "ann" for e in started)
    assert started[-1].data["host_id"] == "hr"
    wait_until(lambda: [e for e in p.events("RunEnded")
                        if e.data["run_id"] == started[-1].data["run_id"]], 30, "RunEnded")
    ended = next(e for e in p.events("RunEnded") if e.data["run_id"] == started[-1].data["run_id"])
    assert ended.data["exit_code"] == 7 and ended.data["seconds"] >= 0


def test_piped_stdin_reaches_the_command(platform: Platform) -> None:
    p = platform
    _ready(p)
    out = p.tally("run", "-a", APP, "--", "python", stdin="print(6 * 7)\n")
    assert out.returncode == 0 and out.stdout.strip() == "42", (out.stdout, out.stderr)
    cat = p.tally("run", "-a", APP, "--", "sh", "-c", "wc -l", stdin="a\nb\nc\n")
    assert cat.stdout.strip() == "3"


def test_bad_runs_fail_with_one_clear_line(platform: Platform) -> None:
    p = platform
    _ready(p)
    missing = p.tally("run", "-a", "nosuchapp", "--", "true")
    assert missing.returncode == 1 and "no app named 'nosuchapp'" in missing.stderr
    absent = p.tally("run", "-a", APP, "--", "no-such-program")
    assert absent.returncode == 1 and "cannot start 'no-such-program'" in absent.stderr
    assert "Traceback" not in absent.stderr + missing.stderr


@pytest.mark.parametrize("who, status", [("bob", "403"), ("agent-hr", "403"), ("", "401")])
def test_others_cannot_start_or_attach_to_a_run(platform: Platform, who: str,
                                                status: str) -> None:
    """Another tenant (a member of another app), an agent's token, and no token at all (an
    app's own process has none: it cannot read TALLY_HOME) start nothing, attach nowhere."""
    import requests

    p = platform
    _ready(p)
    headers = {"Authorization": f"Bearer {p.tokens[who]}"} if who else {}
    r = requests.post(f"{p.api.url}/apps/{APP}/runs", json={"command": ["id"]},
                      headers=headers, timeout=30)
    assert str(r.status_code) == status, r.text
    mine = requests.post(f"{p.api.url}/apps/{APP}/runs", json={"command": ["sleep", "30"]},
                         headers={"Authorization": f"Bearer {p.tokens['ann']}"}, timeout=30)
    assert mine.status_code == 201, mine.text
    assert _handshake(p, mine.json()["attach"], headers) == int(status)
    assert _handshake(p, mine.json()["attach"], {"Authorization": f"Bearer {p.tokens['ann']}"}
                      ) == 101  # ann herself may: the check above refused only the others
    admin = requests.get(p.api.url + mine.json()["attach"], timeout=30,
                         headers={"Authorization": f"Bearer {p.tokens['root']}"})
    assert admin.status_code == 403  # an admin may stop it, not take over ann's terminal


def _handshake(p: Platform, path: str, headers: dict[str, str]) -> int:
    """The status a WebSocket handshake to `path` gets."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(p.api.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", path, headers={**headers, "Connection": "Upgrade",
                                           "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        return conn.getresponse().status
    finally:
        conn.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


SLEEPER = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(300)"


@contextlib.contextmanager
def sleeper(p: Platform, api: str | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """`tally run` of a long sleep: the CLI process and the command's pid on the host (same
    machine here), once the command has printed it."""
    with subprocess.Popen([sys.executable, "-m", "tally.cli", "run", "-a", APP, "--",
                           "python", "-c", SLEEPER], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.PIPE, env=p.env(api=api),
                          cwd=p.home) as cli:
        assert cli.stdout is not None
        try:
            words = Lines(cli.stdout).until(
                lambda raw: raw.decode().startswith("pid") and raw.decode().split(), 120,
                "the command's first line")
            yield cli, int(words[1])
        finally:
            cli.kill()


def test_ctrl_c_stops_the_command_on_the_host(platform: Platform) -> None:
    p = platform
    _ready(p)
    with sleeper(p) as (cli, pid):
        # Quiet but attached: neither side gives up on the other (keep-alives both ways).
        time.sleep(SILENCE_S + 2)  # not a synchronisation: the run must outlast this
        assert cli.poll() is None and not _gone(pid)
        cli.send_signal(signal.SIGINT)
        assert cli.wait(30) == 130  # 128 + SIGINT: the command died of the interrupt
        wait_until(lambda: _gone(pid), 10, "the command gone from the host")


def test_a_command_whose_caller_vanished_is_hung_up(platform: Platform) -> None:
    p = platform
    _ready(p)
    with sleeper(p) as (cli, pid):
        cli.kill()  # kill -9: no Ctrl-C, no goodbye
        wait_until(lambda: _gone(pid), SILENCE_S + 15, "the command hung up")


def test_a_run_whose_agent_dies_ends_with_a_clear_error_and_hangs_up_the_command(
        platform: Platform) -> None:
    p = platform
    _ready(p)
    try:
        with sleeper(p) as (cli, pid):
            p.agent.kill()  # kill -9: the agent says nothing more
            wait_until(lambda: _gone(pid), 10, "the command hung up with its agent")
            assert cli.wait(SILENCE_S + 30) == 1
            assert cli.stderr is not None
            err = cli.stderr.read().decode()
            assert "lost the host agent" in err and "Traceback" not in err, err
    finally:
        p.agent.start()
    lost = [e for e in p.events("RunEnded") if e.data["exit_code"] is None]
    assert lost and "lost the host agent" in lost[-1].data["reason"]
    assert lost[-1].metadata["actor"] == "ann"


def test_a_caller_connected_but_silent_is_hung_up(platform: Platform) -> None:
    """A laptop's lid closed: the connection stays up, nothing more comes from it (no
    keep-alive). The agent hangs the command up after SILENCE_S, as sshd would."""
    from simple_websocket import Client, ConnectionClosed

    p = platform
    _ready(p)
    headers = {"Authorization": f"Bearer {p.tokens['ann']}"}
    r = requests_post(p, "ann", {"command": ["python", "-c", SLEEPER]})
    url = p.api.url.replace("http://", "ws://") + r["attach"] + "?tty=0"
    ws = Client.connect(url, headers=headers)  # answers pings, sends nothing of its own
    try:
        got = b""
        began = time.monotonic()
        while not (line := re.search(rb"pid (\d+)\n", got)):  # output comes in pieces
            msg = ws.receive(timeout=max(1.0, 120 - (time.monotonic() - began)))
            assert msg is not None, "no output from the command"
            got += msg if isinstance(msg, bytes) else b""
        pid = int(line[1])
        wait_until(lambda: _gone(pid), SILENCE_S + 20, "the silent caller's command hung up")

        def exited() -> dict | None:
            msg = ws.receive(timeout=1)
            return json.loads(msg) if isinstance(msg, str) and '"exit"' in msg else None
        # told over the connection it never dropped:
        assert wait_until(exited, 30, "the exit told")["code"] == 128 + signal.SIGHUP
    finally:
        with contextlib.suppress(ConnectionClosed):  # the API closed it after the exit
            ws.close()
    ended = wait_until(lambda: [e for e in p.events("RunEnded")
                                if e.data["number"] == r["number"]], 30, "RunEnded")
    assert ended[0].data["exit_code"] == 128 + signal.SIGHUP


def test_a_run_is_not_attached_after_its_tickets_expired(platform: Platform) -> None:
    """A run's tickets are good for 30 s from its start: later, the API refuses to attach
    (and would the agent, the ticket having expired with the run's start), so nothing
    starts the command then, however late or often one asks."""
    from datetime import datetime

    from ledger.tickets import TTL_S

    p = platform
    _ready(p)
    r = requests_post(p, "ann", {"command": ["true"]})
    started = datetime.fromisoformat(r["started_at"]).timestamp()
    wait_until(lambda: time.time() > started + TTL_S + 1, TTL_S + 30, "the tickets' time past")
    headers = {"Authorization": f"Bearer {p.tokens['ann']}"}
    assert _handshake(p, r["attach"], headers) == 409
    import requests

    late = requests.get(p.api.url + r["attach"], headers=headers, timeout=30)
    assert late.status_code == 409 and "can no longer be attached" in late.json()["message"]
    assert not [e for e in p.events("RunEnded") if e.data["number"] == r["number"]]


def requests_post(p: Platform, who: str, body: dict, api: str | None = None) -> dict:
    """POST /apps/APP/runs as `who`: the run (201 expected)."""
    import requests

    r = requests.post(f"{api or p.api.url}/apps/{APP}/runs", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {p.tokens[who]}"})
    assert r.status_code == 201, r.text
    return r.json()


def test_attached_runs_do_not_starve_the_api(platform: Platform) -> None:
    """Each attached run holds one of its API process's threads: they get threads of their
    own (--run-slots), so other requests are still answered while they go on; past them,
    a clear refusal, and the refused run is not left listed."""
    p = platform
    _ready(p)
    small = ApiProcess(tally_env(p.cluster, TALLY_RUN_KEY=p.key.hex()), free_ports(1)[0],
                       ("--workers", "1", "--threads", "2", "--run-slots", "2"))
    try:
        small.wait_ready()
        with sleeper(p, small.url), sleeper(p, small.url):
            info = p.tally("apps:info", "-a", APP, api=small.url, timeout=60)
            assert info.returncode == 0 and "owner:" in info.stdout, info.stderr
            third = p.tally("run", "-a", APP, "--", "true", api=small.url)
            assert third.returncode == 1, third.stderr
            assert "relaying as many attached runs as it may: try again" in third.stderr
            assert "Traceback" not in third.stderr
            refused = max(e.data["number"] for e in p.events("RunStarted"))
            (ended,) = [e for e in p.events("RunEnded") if e.data["number"] == refused]
            assert "never attached" in ended.data["reason"]
            assert f"run.{refused} " not in p.tally("ps", "-a", APP, api=small.url).stdout
    finally:
        small.stop()


# --- an interactive session -----------------------------------------------------------------


class Terminal:
    """The CLI on a pty of ours, as a developer's terminal runs it."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the CLI, its terminal our pty
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", "tally.cli", *argv], env)
        self.seen = b""

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, text: bytes, timeout: float = 60) -> None:
        def found() -> bool:
            import select
            if select.select([self.fd], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 65536)
            return text in self.seen
        wait_until(found, timeout, f"{text!r} on the terminal; seen {self.seen[-300:]!r}")

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.kill(self.pid, signal.SIGWINCH)

    def wait(self, timeout: float = 30) -> int:
        def ended() -> int | None:
            with contextlib.suppress(OSError):
                self.seen += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            return os.waitstatus_to_exitcode(status) if pid else None
        code = wait_until(lambda: (c := ended()) is not None and (c,), timeout, "the CLI's exit")
        return code[0]


def test_an_interactive_session_on_a_pty(platform: Platform) -> None:
    p = platform
    _ready(p)
    term = Terminal(["run", "-a", APP, "--", "python", "-q"], p.env(), p.home)
    term.resize(30, 100)
    term.expect(b">>> ")
    term.send(b"print(6 * 7)\r")  # typed keys, echoed by the remote terminal
    term.expect(b"print(6 * 7)")
    term.expect(b"42")
    term.send(b"import shutil; print('size', shutil.get_terminal_size())\r")
    term.expect(b"columns=100, lines=30")
    term.resize(40, 120)

    def resized() -> bool:  # the new size goes out beside the keys: ask until it is there
        term.send(b"print('size', shutil.get_terminal_size())\r")
        with contextlib.suppress(AssertionError):
            term.expect(b"columns=120, lines=40", 1)
            return True
        return False
    wait_until(resized, 30, "the remote terminal resized")
    term.send(b"import time; time.sleep(60)\r")
    time.sleep(0.5)  # not a synchronisation: Ctrl-C must come while it sleeps, or later
    term.send(b"\x03")  # Ctrl-C, a key for the remote terminal, as in ssh
    term.expect(b"KeyboardInterrupt")
    term.send(b"raise SystemExit(5)\r")
    assert term.wait() == 5


def test_ctrl_d_ends_an_interactive_shell(platform: Platform) -> None:
    p = platform
    _ready(p)
    term = Terminal(["run", "-a", APP, "--", "python", "-q"], p.env(), p.home)
    term.expect(b">>> ")
    term.send(b"\x04")
    assert term.wait() == 0


# --- detached runs ---------------------------------------------------------------------------


def test_a_detached_run_is_listed_logged_and_stopped(platform: Platform) -> None:
    p = platform
    _ready(p)
    started = p.tally("run:detached", "-a", APP, "--", "python", "-u", "-c",
                      "import time\nwhile True: print('tick', flush=True); time.sleep(0.2)")
    assert started.returncode == 0, started.stderr
    number = started.stderr.split("run.")[1].split()[0]
    assert f"run.{number}" in p.tally("ps", "-a", APP).stdout
    wait_until(lambda: f"run.{number} tick" in p.tally("logs", "-a", APP).stdout, 60,
               "the run's output in the app's logs")
    stopped = p.tally("ps:stop", "-a", APP, f"run.{number}")
    assert stopped.returncode == 0 and "done" in stopped.stderr, stopped.stderr
    ended = wait_until(lambda: [e for e in p.events("RunEnded")
                                if e.data["number"] == int(number)], 30, "RunEnded")
    assert ended[0].data["exit_code"] == 128 + signal.SIGTERM
    assert f"run.{number}" not in p.tally("ps", "-a", APP).stdout


# --- every user command from a developer's machine --------------------------------------------


def test_user_commands_work_with_only_the_api_url_and_a_token(platform: Platform) -> None:
    """No TALLY_HOME, no ledger ports: HOME is a fresh folder, TALLY_API and TALLY_TOKEN are
    all there is. The confirmation lines are Heroku's."""
    p = platform
    _ready(p)
    info = p.tally("apps:info", "-a", APP)
    assert info.returncode == 0 and "owner:" in info.stdout, info.stderr
    assert p.tally("apps:info", APP).stdout == info.stdout  # positional, as before
    changed = p.tally("config:set", "-a", APP, "LEVEL=3")
    assert changed.returncode == 0, changed.stderr
    assert re.fullmatch(rf"Setting LEVEL and restarting {APP}\.\.\. done, v\d+\n",
                        changed.stderr), changed.stderr
    releases = p.tally("releases", "-a", APP)
    assert releases.stdout.split("\n")[0].split()[:2] == ["VERSION", "STATUS"]
    assert "FAILURE" in releases.stdout
    for args in (("why", "-a", APP), ("why", APP)):
        why = p.tally(*args)
        assert why.returncode == 0 and why.stdout.startswith(APP), why.stderr
    events = p.tally("events", "-a", APP, "--limit", "3", "--json")
    rows = [json.loads(line) for line in events.stdout.splitlines()]
    assert len(rows) == 3 and rows[-1]["type"] in ("ConfigChanged", "ReleaseCreated",
                                                  "RunStarted", "RunEnded"), events.stderr
    assert "LEVEL" in str(rows) and "'3'" not in str(rows)  # config values redacted
    assert p.tally("events", "--limit", "1").returncode == 1  # the whole ledger: admins'
    assert p.tally("events", "--limit", "1", who="root").returncode == 0
    for args in (("stats", "-a", APP), ("ps", "-a", APP), ("addons", "-a", APP),
                 ("logs", "-a", APP), ("config", "-a", APP)):
        out = p.tally(*args)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (args, out.stderr)
    state = p.tally("state", "--at", "5", "--view", "apps", "--json", who="root")
    assert state.returncode == 0 and "apps" in json.loads(state.stdout), state.stderr
    diff = p.tally("diff", "1", "40", who="root")
    assert diff.returncode == 0 and "apps:" in diff.stdout, diff.stderr


def test_events_and_logs_follow_over_the_api(platform: Platform) -> None:
    p = platform
    _ready(p)
    with subprocess.Popen([sys.executable, "-m", "tally.cli", "events", "-a", APP, "-f",
                           "--limit", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, env=p.env(), cwd=p.home, text=True) as ev, \
            subprocess.Popen([sys.executable, "-m", "tally.cli", "logs", "-a", APP, "-f",
                              "-n", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, env=p.env(), cwd=p.home, text=True) as lg:
        assert ev.stdout is not None and lg.stdout is not None
        try:
            ev.stdout.readline()  # the newest event, then the ones to come
            marker = uuid.uuid4().hex[:8]
            assert p.tally("run:detached", "-a", APP, "--", "echo", marker).returncode == 0
            wait_until(lambda: "RunStarted" in ev.stdout.readline(), 60, "RunStarted followed")
            wait_until(lambda: marker in lg.stdout.readline(), 60, "the run's line followed")
        finally:
            ev.kill()
            lg.kill()


def test_events_follow_misses_nothing_written_while_it_starts(platform: Platform) -> None:
    """`tally events -a APP -f` started while the app's stream is being written to: from
    the first event it shows, it shows every one, in order. Its first page and the point
    it follows from are one read of the ledger's head; were they two, whatever landed
    between them would be lost."""
    p = platform
    app = f"tail-{uuid.uuid4().hex[:6]}"
    with Ledger(p.cluster.dsn()) as ledger:
        create_app(ledger, app)
    stop, written = threading.Event(), []

    def write() -> None:
        with Ledger(p.cluster.dsn()) as ledger:
            n = 0
            while not stop.is_set():
                n += 1
                written.append(ledger.append(f"app-{app}", [NewEvent("ConfigChanged", {
                    "app": app, "set": {"N": str(n)}, "config_version": n})]).version)
                time.sleep(0.005)  # a steady writer's pace, not a synchronisation
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    wait_until(lambda: len(written) > 5, 60, "the writer under way")
    with subprocess.Popen([sys.executable, "-m", "tally.cli", "events", "-a", app, "-f",
                           "--limit", "5", "--json"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=p.env(),
                          cwd=p.home, text=True) as ev:
        assert ev.stdout is not None
        lines = Lines(ev.stdout)
        try:
            seen = [json.loads(lines.next(120, "the first event"))["version"]]
            while len(seen) < 40:  # well past its start, the writer still going
                seen.append(json.loads(lines.next(60, "the next event"))["version"])
            stop.set()
            writer.join(30)
            while seen[-1] < written[-1]:
                seen.append(json.loads(lines.next(60, "the last events"))["version"])
        finally:
            stop.set()
            ev.kill()
    assert seen == list(range(seen[0], written[-1] + 1)), seen


def test_a_reader_that_leaves_early_gets_no_traceback(platform: Platform) -> None:
    """`tally events | head -1`: the CLI exits quietly, as git does."""
    p = platform
    _ready(p)
    with subprocess.Popen([sys.executable, "-m", "tally.cli", "events", "-a", APP, "--limit",
                           "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, env=p.env(), cwd=p.home) as cli:
        assert cli.stdout is not None and cli.stderr is not None
        cli.stdout.readline()
        cli.stdout.close()  # the reader is gone
        cli.wait(60)
        err = cli.stderr.read().decode()
    assert "Traceback" not in err and "Broken pipe" not in err and "Errno" not in err, err


def test_a_run_cannot_read_the_ticket_key(platform: Platform) -> None:
    """From inside a one-off run (as the app's user): the key is in no environment it can
    read, neither its own nor the agent's that started it."""
    p = platform
    _ready(p)
    out = p.tally("run", "-a", APP, "--", "sh", "-c",
                  "env; cat /proc/$PPID/environ /proc/1/environ; echo done")
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    for secret in (p.key.hex(), host_key(p.key, "hr").hex(), "TALLY_RUN_KEY"):
        assert secret not in out.stdout


def test_a_run_sees_no_other_process(platform: Platform) -> None:
    """A one-off run gets the private /proc an instance gets (hidepid=2, agents/runtime.py):
    pid 1, the agent and this test are invisible to it; itself it still sees. (w13)"""
    p = platform
    _ready(p)
    out = p.tally("run", "-a", APP, "--", "sh", "-c",
                  f"ls /proc; cat /proc/1/cmdline /proc/{os.getpid()}/cmdline; echo done")
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    listed = {w for w in out.stdout.split() if w.isdigit()}
    assert listed and not {"1", str(os.getpid())} & listed, listed
    assert "No such file" in out.stdout + out.stderr


def test_a_run_that_fills_its_disk_gets_enospc_and_leaves_the_hosts_alone(
        platform: Platform) -> None:
    """A one-off run writes /tmp and /app full (dd, 1 MiB blocks, past its size's limit):
    it gets "No space left on device" at its `disk_mb`, and the layer's folder on the host
    stays empty (the run's files were in a tmpfs of its own namespace)."""
    from ledger.sizes import size_of

    p = platform
    _ready(p)
    limit = size_of(None).disk_mb
    out = p.tally("run", "-a", APP, "--", "sh", "-c",
                  f"dd if=/dev/zero of=/tmp/fill bs=1M count={limit + 64}; "
                  f"ls -l /tmp/fill; rm /tmp/fill; "
                  f"dd if=/dev/zero of=/app/fill bs=1M count={limit + 64}; echo done")
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    said = out.stdout + out.stderr  # the run's stderr comes through its one stream
    assert said.count("No space left on device") == 2, said
    size = int(next(line for line in said.splitlines() if line.endswith("/tmp/fill")).split()[4])
    assert (limit - 64) * 2**20 <= size <= limit * 2**20, out.stdout
    layers = p.agent.home / "agents" / "hr" / "instances"
    assert sum(f.lstat().st_size for f in layers.rglob("*")) < 2**20, "on the host's disk"


def test_a_run_never_attached_is_stopped_and_recorded(platform: Platform) -> None:
    """A run posted but never attached stays listed until ps:stop; its agent knows no such
    command, so the API records its end."""
    import requests

    p = platform
    _ready(p)
    r = requests.post(f"{p.api.url}/apps/{APP}/runs", json={"command": ["sleep", "1"]},
                      headers={"Authorization": f"Bearer {p.tokens['ann']}"}, timeout=30)
    number = r.json()["number"]
    assert f"run.{number} " in p.tally("ps", "-a", APP).stdout
    stopped = p.tally("ps:stop", "-a", APP, f"run.{number}")
    assert stopped.returncode == 0, stopped.stderr
    assert f"run.{number} " not in p.tally("ps", "-a", APP).stdout
    (ended,) = [e for e in p.events("RunEnded") if e.data["number"] == number]
    assert ended.data["exit_code"] is None and "never attached" in ended.data["reason"]
