"""A real HTTP/1.1 backend for the balancer's tests: raw sockets, one thread per connection,
keep-alive, Content-Length and chunked bodies both ways, and a few paths that misbehave on
purpose. It records the connections and requests it saw, so tests can check what reached
it (keep-alive reuse, headers, that a refused request never arrived).

Paths: `/upload` answers the size and sha256 of the body; `/chunked?n=K` answers K chunks;
`/slow?s=X` waits X seconds first; `/ws` switches protocols and echoes bytes; `/split`
sends its head and body apart; `/garbage` answers something that is not HTTP; `/close`
answers until it closes (no length); `/then-close` closes the connection after
answering; anything else a JSON echo of the request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit


class Upstream:
    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(512)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.connections = 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                n = self.connections
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline(65536)
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (h := reader.readline(65536)) not in (b"\r\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                digest, size = hashlib.sha256(), 0
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    while (chunk := int(reader.readline().split(b";")[0], 16)):
                        data = reader.read(chunk)
                        digest.update(data)
                        size += len(data)
                        reader.readline()
                    while reader.readline() not in (b"\r\n", b""):
                        pass
                else:
                    left = int(headers.get("content-length", "0"))
                    while left:
                        data = reader.read(min(left, 1 << 20))
                        digest.update(data)
                        size += len(data)
                        left -= len(data)
                url = urlsplit(target)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with self.lock:
                    self.requests.append({"method": method, "path": url.path,
                                          "headers": headers, "conn": n, "size": size})
                if not self._answer(conn, reader, method, url.path, query, headers, n,
                                    size, digest.hexdigest()):
                    return
        except (OSError, ValueError):
            return
        finally:
            reader.close()
            conn.close()

    def _answer(self, conn: socket.socket, reader, method: str, path: str, query: dict,
                headers: dict, n: int, size: int, sha: str) -> bool:
        if path == "/slow":
            time.sleep(float(query.get("s", "1")))
        if path == "/garbage":
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            return False
        if path == "/ws":
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            while data := reader.read1(65536):
                conn.sendall(data)
            return False
        if path == "/chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(int(query.get("n", "3"))):
                part = f"{self.name}-{i};".encode()
                conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            conn.sendall(b"0\r\n\r\n")
            return True
        if path == "/upload":
            body = json.dumps({"bytes": size, "sha256": sha, "backend": self.name}).encode()
        else:
            body = json.dumps({"backend": self.name, "conn": n, "path": path, "method": method,
                               "headers": headers}).encode()
        if path == "/split":  # the head, then the body a moment later (as gunicorn does)
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            time.sleep(0.05)
            conn.sendall(body)
            return True
        if path == "/close":
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
            return False
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" \
               f"Content-Length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + (b"" if method == "HEAD" else body))
        if path == "/then-close":
            return False  # closes a kept-alive connection unannounced (a keep-alive timeout)
        return headers.get("connection", "").lower() != "close"
