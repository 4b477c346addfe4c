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


def test_the_shipper_sends_whole_lines_and_keeps_the_host_disk_small(tmp_path: Path) -> None:
    """Whole lines go out; the offset moves only with the collector's acknowledgement; a
    log fully acknowledged is emptied past keep_bytes, removed once its instance is gone."""
    import zmq

    from agents.logs import Shipper
    from tests.waiting import wait_until

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVTIMEO, 10_000)  # a lost message fails the test, never hangs it
    port = router.bind_to_random_port("tcp://127.0.0.1")
    shipper = Shipper(f"tcp://127.0.0.1:{port}", tmp_path, ctx, keep_bytes=10)
    iid = "blog.1.web.a"

    def deliver() -> tuple[bytes, int, bytes]:
        """Receive one message as the collector does and acknowledge it."""
        peer, app, name, epoch, offset, data = router.recv_multipart()
        assert (app, name) == (b"blog", iid.encode())
        router.send_multipart([peer, name, epoch, b"%d" % (int(offset) + len(data))])
        return epoch, int(offset), data

    def acked(n: int) -> None:
        wait_until(lambda: shipper.take_acks() or shipper.offsets[iid] == n, 10,
                   f"acknowledged up to {n}")

    try:
        log = tmp_path / f"{iid}.log"
        log.write_bytes(b"one\ntwo\npart")
        wait_until(lambda: shipper.ship(running={iid}) == 8, 10, "connected and sent")
        assert shipper.offsets[iid] == 0  # sent, not acknowledged yet
        assert deliver() == (b"0", 0, b"one\ntwo\n")
        acked(8)
        assert log.read_bytes() == b"one\ntwo\npart"  # not all shipped: kept
        with open(log, "ab") as f:
            f.write(b"ial\n")
        assert shipper.ship(running={iid}) == 8
        assert deliver() == (b"0", 8, b"partial\n")
        acked(16)
        shipper.ship(running={iid})
        assert log.stat().st_size == 0  # all acknowledged and past keep_bytes: emptied
        again = Shipper(f"tcp://127.0.0.1:{port}", tmp_path, ctx)
        again.close()
        assert again.offsets == {iid: 0}  # offsets survive a restart
        assert again.positions[iid].epoch == 1  # a new count since the file was emptied
        log.write_bytes(b"last\n")
        shipper.ship(running=set())
        assert deliver() == (b"1", 0, b"last\n")
        acked(5)
        shipper.ship(running=set())
        assert not log.exists()  # its instance is gone and everything was acknowledged
    finally:
        shipper.close()
        router.close()
        ctx.destroy(linger=0)  # closes any socket an early failure left open
