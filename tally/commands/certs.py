"""`tally certs`, `certs:add`, `certs:remove`: an app's certificates, which the balancers
serve over HTTPS by SNI (the API checks a pair and seals its key before recording it)."""

from __future__ import annotations

from pathlib import Path

import click

from tally.client import Client
from tally.commands.args import app_option
from tally.commands.http import doing, emit, http_command
from tally.console import table


def _read_pem(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint=option) from None


@http_command("certs", json_output=True)
@app_option
def certs(client: Client, app: str, as_json: bool) -> None:
    """The app's certificates (served by the balancers over HTTPS, by SNI)."""
    emit(client.get(f"/apps/{app}/certs")["items"], as_json, lambda rows: table(
        rows, ["cert_id", "hostnames", "not_after", "source"],
        empty=f"{app} has no certificate"))


@http_command("certs:add")
@app_option
@click.option("--cert", "cert_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The certificate chain, PEM, leaf first.")
@click.option("--key", "key_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Its private key, PEM (sealed by the API before it is recorded).")
def certs_add(client: Client, app: str, cert_file: Path, key_file: Path) -> None:
    """Serve your own certificate for the app's hostnames it names:
    `tally certs:add -a blog --cert blog.crt --key blog.key`."""
    body = {"cert": _read_pem(cert_file, "--cert"), "key": _read_pem(key_file, "--key")}
    doing(f"Adding a certificate to {app}",
          lambda: client.post(f"/apps/{app}/certs", body),
          lambda c: f"done, {c['cert_id']} for {', '.join(c['hostnames'])} until "
                    f"{c['not_after'][:10]}")


@http_command("certs:remove")
@app_option
@click.argument("cert_id")
def certs_remove(client: Client, app: str, cert_id: str) -> None:
    """Stop serving a certificate: `tally certs:remove -a blog CERT_ID`."""
    doing(f"Removing certificate {cert_id} from {app}",
          lambda: client.request("DELETE", f"/apps/{app}/certs/{cert_id}"))


COMMANDS = [certs, certs_add, certs_remove]
