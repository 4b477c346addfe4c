"""Self-signed certificates for the HTTPS tests, made in memory with `cryptography` (fast,
no openssl subprocess): a leaf naming DNS names, valid for a given window; and one HTTPS
request that tells which certificate was presented."""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def self_signed(names: list[str], days: float = 30, start: datetime | None = None,
                key: ec.EllipticCurvePrivateKey | None = None) -> tuple[str, str]:
    """(certificate PEM, key PEM) for `names`, valid from `start` (an hour ago) for `days`."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    start = start or datetime.now(UTC) - timedelta(hours=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem(key)


def tls_get(port: int, server_name: str, minimum: object = None) -> tuple[bytes, bytes]:
    """(the certificate the balancer presented, the response) for one HTTPS request."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed: we compare the certificate itself
    if minimum is not None:
        ctx.minimum_version = ctx.maximum_version = minimum  # type: ignore[assignment]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        cert = s.getpeercert(binary_form=True)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return cert, out
