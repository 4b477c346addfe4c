"""The collector's files: lines stamped with time and instance, rotated by size, read back
across chunks; names that are not app names never become paths."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from agents.logs import Collector, chunks, tail

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_lines_are_stamped_rotated_by_size_and_read_back_in_order(tmp_path: Path) -> None:
    c = Collector(tmp_path, max_bytes=200)
    for n in range(20):
        c.write("blog", "blog.1.web.a", f"line {n}\n".encode(), NOW)
    files = chunks(tmp_path, "blog")
    assert len(files) > 2
    assert all(f.stat().st_size < 300 for f in files)
    last = tail(tmp_path, "blog", 20)
    assert [line.split(" ", 2)[2] for line in last] == [f"line {n}" for n in range(20)]
    assert last[0].startswith("2026-01-01T00:00:00.000000Z blog.1.web.a ")
    assert tail(tmp_path, "blog", 3)[-1].endswith("line 19")


def test_a_name_that_is_not_an_app_writes_nothing(tmp_path: Path) -> None:
    Collector(tmp_path / "logs").write("../etc", "x", b"owned\n", NOW)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "logs").exists()


def test_the_shipper_sends_whole_lines_once_and_keeps_the_host_disk_small(
        tmp_path: Path) -> None:
    import zmq

    from agents.logs import Shipper

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, 10_000)  # a lost message fails the test, never hangs it
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    shipper = Shipper(f"tcp://127.0.0.1:{port}", tmp_path, ctx, keep_bytes=10)
    try:
        log = tmp_path / "blog.1.web.a.log"
        log.write_bytes(b"one\ntwo\npart")
        assert shipper.ship(running={"blog.1.web.a"}) == 8
        assert pull.recv_multipart() == [b"blog", b"blog.1.web.a", b"one\ntwo\n"]
        assert log.read_bytes() == b"one\ntwo\npart"  # not all shipped: kept
        with open(log, "ab") as f:
            f.write(b"ial\n")
        assert shipper.ship(running={"blog.1.web.a"}) == 8
        assert pull.recv_multipart()[2] == b"partial\n"
        assert log.stat().st_size == 0  # all shipped and past keep_bytes: emptied
        again = Shipper(f"tcp://127.0.0.1:{port}", tmp_path, ctx)
        again.close()
        assert again.offsets == {"blog.1.web.a": 0}  # offsets survive a restart
        log.write_bytes(b"last\n")
        shipper.ship(running=set())
        assert pull.recv_multipart()[2] == b"last\n"
        assert not log.exists()  # its instance is gone and everything was shipped
    finally:
        shipper.close()
        pull.close()
        ctx.destroy(linger=0)  # closes any socket an early failure left open
