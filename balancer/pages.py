"""The pages the balancer answers itself: unknown host, maintenance, no backend, errors.

Small HTML a person can read in a browser, with the reason on one line for curl users.
"""

from __future__ import annotations

from html import escape

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large", 414: "URI Too Long", 417: "Expectation Failed",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

UNKNOWN_HOST = "No app answers to this hostname."
MAINTENANCE = "This app is down for maintenance. Please check back soon."
NO_BACKEND = "This app has no healthy instance right now. Please try again shortly."
BAD_GATEWAY = "The app's instance did not answer properly."
GATEWAY_TIMEOUT = "The app's instance took too long to answer."


def redirect(location: bytes, *, close: bool, head: bool) -> bytes:
    """308 Permanent Redirect (method and body kept) to `location`, which is built from a
    validated Host and request target: no CR or LF can be in it."""
    body = b"Redirecting to " + location + b"\n"
    head_bytes = (b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\n"
                  b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
                  % (location, len(body), b"close" if close else b"keep-alive"))
    return head_bytes + (b"" if head else body)


def text(status: int, body: bytes, *, close: bool, head: bool) -> bytes:
    """A plain-text answer of ours (an ACME challenge's key authorization)."""
    head_bytes = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                  b"Cache-Control: no-store\r\nConnection: %s\r\n\r\n"
                  % (status, REASONS.get(status, "OK").encode(), len(body),
                     b"close" if close else b"keep-alive"))
    return head_bytes + (b"" if head else body)


def page(status: int, text: str, *, close: bool = True, head: bool = False,
         extra: bytes = b"") -> bytes:
    """A whole response: head, and the HTML body unless answering a HEAD request.
    `extra` is more header lines (each ending in CRLF), e.g. Retry-After."""
    reason = REASONS.get(status, "Error")
    body = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status} {reason}"
            f"</title></head>\n<body><h1>{status} {reason}</h1>\n<p>{escape(text)}</p>\n"
            f"<hr><p><small>tally</small></p></body></html>\n").encode()
    head_bytes = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
                  f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                  f"Connection: {'close' if close else 'keep-alive'}\r\n").encode()
    return head_bytes + extra + b"\r\n" + (b"" if head else body)
