"""The client library of the API, for the `tally` CLI: saved credentials, one error type
with the server's one-line reason, bundle upload with progress, streamed lines. It reads
no environment: tally/config.py says which API, which token and where credentials are."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

DEFAULT_API = "http://127.0.0.1:8000"

class ClientError(Exception):
    """A failure to show the user as one line."""


def load_credentials(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read credentials {path}: {exc}") from exc


def save_credentials(path: Path, api: str, token: str, user: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only to a file created now
    with os.fdopen(fd, "w") as f:
        json.dump({"api": api, "token": token, "user": user}, f)
    return path


class Client:
    def __init__(self, api: str | None = None, token: str | None = None,
                 credentials: Path | None = None) -> None:
        """`api` and `token` as given, else as saved in `credentials` (`tally login`)."""
        creds = load_credentials(credentials) if credentials else {}
        self.api = (api or creds.get("api") or DEFAULT_API).rstrip("/")
        self.token = token or creds.get("token")
        import requests  # here, not at import: every `tally` command loads this module

        self.session = requests.Session()

    def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201, 204),
                timeout: float = 60, **kw: Any) -> Any:
        import requests

        headers = kw.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            r = self.session.request(method, self.api + path, headers=headers,
                                     timeout=timeout, **kw)
        except requests.ConnectionError as exc:
            raise ClientError(f"cannot reach the tally API at {self.api} "
                              f"(is `tally up` running? set --api or TALLY_API)") from exc
        except requests.Timeout as exc:
            raise ClientError(f"the tally API at {self.api} did not answer in time") from exc
        except (requests.RequestException, ValueError) as exc:  # a malformed URL, mostly
            raise ClientError(f"cannot call the tally API at {self.api!r}: {exc} "
                              f"(set --api or TALLY_API to http://HOST:PORT)") from exc
        if r.status_code not in expect:
            raise ClientError(_reason(r))
        if r.status_code == 204 or not r.content:
            return None
        try:
            return r.json()
        except ValueError as exc:
            raise ClientError(f"{self.api} answered {path} with something that is not JSON "
                              f"(is TALLY_API the tally API?)") from exc

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None})

    def stream_lines(self, path: str, **params: Any) -> Iterator[str]:
        """The `data:` lines of a server-sent event stream, as they come. The server sends
        a comment every few seconds: silence past the read timeout means it is gone."""
        for _event, data in self.stream_events("GET", path, params=params):
            yield data

    def stream_events(self, method: str, path: str, **kw: Any) -> Iterator[tuple[str, str]]:
        """(event, data) of each event of a server-sent event stream (event "" when
        unnamed), as they come."""
        import requests

        headers = {"Accept": "text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            with self.session.request(method, self.api + path, headers=headers, stream=True,
                                      timeout=(10, 30), **kw) as r:
                if r.status_code != 200:
                    raise ClientError(_reason(r))
                event = ""
                for raw in r.iter_lines():
                    line = raw.decode("utf-8", "replace")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        yield event, line[6:]
                        event = ""
        except requests.ConnectionError as exc:
            raise ClientError(f"lost the tally API at {self.api} (it went silent or "
                              f"closed the stream)") from exc
        except requests.RequestException as exc:
            raise ClientError(f"cannot follow {path} at {self.api}: {exc}") from exc

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json=body)

    def upload(self, path: str, data: bytes, params: dict[str, Any],
               progress: Callable[[int], None]) -> Any:
        return self.request("POST", path, data=_Progress(data, progress), params=params,
                            headers={"Content-Type": "application/gzip"}, timeout=600)


def _reason(r: requests.Response) -> str:
    try:
        body = r.json()
        message = body.get("message") or body.get("error")
    except ValueError:
        message = r.text.strip()[:200] or r.reason
    if r.status_code == 401:
        return f"{message}"
    return f"{message} (HTTP {r.status_code})"


class _Progress:
    """A body requests can size (Content-Length) that reports each chunk it hands out."""

    def __init__(self, data: bytes, progress: Callable[[int], None]) -> None:
        self.data, self.offset, self.progress = data, 0, progress

    def __len__(self) -> int:
        return len(self.data) - self.offset

    def read(self, size: int = -1) -> bytes:
        size = len(self.data) if size < 0 else min(size, 1 << 16)
        chunk = self.data[self.offset:self.offset + size]
        self.offset += len(chunk)
        self.progress(len(chunk))
        return chunk
