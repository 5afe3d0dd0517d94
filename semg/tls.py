"""HTTPS for the services people reach over the network: the web UI, the REST API and the UDP server's metrics.

Set ``SEMG_TLS_CERT_FILE`` (a PEM certificate, or a chain with the server's certificate first, e.g. Let's
Encrypt's ``fullchain.pem``) and ``SEMG_TLS_KEY_FILE`` (its unencrypted PEM private key). Unset, they speak plain
HTTP, which is fine on 127.0.0.1; on a network the UI password and API keys would cross it readable, and
browsers give the capture page a webcam only over HTTPS (or on localhost).

Servers load the pair with ``server_context`` (checked first by ``problem``, so a bad file is one clear line at
start, not a traceback or a password prompt). The platform's own clients (inference worker -> API, UI -> API and
metrics, ``semg.health``) reach the services at ``Settings.service_host`` (127.0.0.1 under the Docker image),
a name the certificate does not carry, so ``client_context`` trusts exactly the certificates in
``SEMG_TLS_CERT_FILE`` (pinned) instead of checking a host name: nothing but the holder of that key can answer
them, which a name check against the public CAs would not guarantee either.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from semg.config import Settings, SettingsError

# A connection must finish its TLS handshake within this time (asyncio's default is 60 s): a client that connects
# and sends nothing holds a file descriptor until then, before any HTTP-level guard sees it.
HANDSHAKE_TIMEOUT_S = 10.0

# OpenSSL's X509_V_FLAG_PARTIAL_CHAIN: a certificate of the trust store is an anchor even if it is not a root,
# so pinning the server's own (CA-issued) certificate works. Python 3.11's ssl may lack the name.
_PARTIAL_CHAIN = getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)


class TlsError(SettingsError):
    """SEMG_TLS_CERT_FILE / SEMG_TLS_KEY_FILE cannot be used; the message says why in one line."""


def _refuse_password() -> bytes:
    # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on a terminal nobody watches.
    raise TlsError("SEMG_TLS_KEY_FILE is encrypted (has a passphrase): give the key unencrypted, readable only by "
                   "the user that runs the platform (e.g. `openssl pkey -in KEY -out KEY.plain`, then chmod 600)")


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    for var, path in (("SEMG_TLS_CERT_FILE", cert), ("SEMG_TLS_KEY_FILE", key)):
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise TlsError(f"{var}={str(path)!r}: cannot be read ({e.strerror or e})") from None
    try:
        ssl.create_default_context(cafile=str(cert))  # parses the certificate(s) alone, to say which file is wrong
    except ssl.SSLError:
        raise TlsError(f"SEMG_TLS_CERT_FILE={str(cert)!r}: no PEM certificate in it") from None
    try:
        ctx.load_cert_chain(cert, key, password=_refuse_password)
    except TlsError:
        raise
    except ssl.SSLError as e:
        if "mismatch" in str(e).lower():
            raise TlsError(f"SEMG_TLS_KEY_FILE={str(key)!r} is not the key of SEMG_TLS_CERT_FILE={str(cert)!r}") from None
        raise TlsError(f"SEMG_TLS_KEY_FILE={str(key)!r}: not a PEM private key ({e.reason or e})") from None


def server_context(s: Settings) -> ssl.SSLContext | None:
    """The TLS context the HTTP services serve with (Python's secure defaults: TLS 1.2 or newer), or None when
    SEMG_TLS_CERT_FILE is unset. Raises TlsError (one line) when the files cannot be used."""
    files = s.tls_files
    if files is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_pair(ctx, *files)
    return ctx


def problem(s: Settings) -> str | None:
    """Why the TLS files cannot be served (one line), or None (also when TLS is off)."""
    try:
        server_context(s)
    except TlsError as e:
        return str(e)
    return None


def client_context(s: Settings) -> ssl.SSLContext | None:
    """For the platform's own clients of its HTTPS services: trusts exactly SEMG_TLS_CERT_FILE's certificates
    (no host name check, see the module docstring); None when TLS is off (plain HTTP)."""
    files = s.tls_files
    if files is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files[0]))
    ctx.check_hostname = False  # the pinned certificate is the check
    ctx.verify_flags |= _PARTIAL_CHAIN
    return ctx


def httpx_verify(s: Settings) -> ssl.SSLContext | bool:
    """The `verify=` argument for httpx calls to the platform's services."""
    return client_context(s) or True
