"""TLS: the certificates of the TLS listeners and the CA files of upstream TLS, re-read
when their files change.

Vocabulary
----------
CertSet
    The server contexts of one listener built from its files at one moment: the default
    one and one per ``certificates`` entry, by host name (exact names, and ``*.suffix``
    wildcards matched like ``routes.hosts``: the longest suffix wins). Never changed once
    built: a reload builds a new one and swaps it whole.
TlsListener
    One TLS listener: ``context``, the ``ssl.SSLContext`` its server was created with,
    whose ``sni_callback`` gives every handshake the context of the *current* CertSet for
    the name the client asked for (the default one for no name or an unknown name). So a
    reload needs no new listening socket, and open connections keep the session they
    negotiated.
UpstreamTls
    The client context of one service's upstream TLS (CA file, server name); pools read
    ``context`` when they open a connection.

TLS 1.2 and 1.3 only (``minimum_version``), ALPN ``http/1.1``, no compression.

Reload: every ``RELOAD_EVERY`` seconds the server calls ``check()``, which only stats the
files (mtime, size, inode: a few µs each). A signature that differs from the one in force
and is the same as at the check before (so a file being written is not read half-way)
is loaded. A load that fails is logged with the file and the reason, counted in
``/metrics`` (``meshlet_proxy_tls_reloads_total{result="error"}``,
``meshlet_proxy_tls_files_invalid`` 1) and shown in the admin API's ``/tls``; the
certificates in force stay, until the files are fixed.

Errors: ``TlsFileError`` (a ValueError) names the file and what is wrong with it: missing
or unreadable, no PEM certificate or key in it, an encrypted key, a key that does not
match its certificate, a certificate that is expired or not valid yet.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING, Any, Callable

import config

if TYPE_CHECKING:  # pragma: no cover
    from ._metrics import Metrics

__all__ = ["TlsFileError", "TlsListener", "UpstreamTls", "CertSet", "server_context", "client_context",
           "RELOAD_EVERY"]

log = logging.getLogger("meshlet.proxy.tls")

RELOAD_EVERY = 1.0  # seconds between checks of the files (a reload lands 1-2 checks after a change)
ALPN = ["http/1.1"]


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


# -- loading ---------------------------------------------------------------------------------

def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TlsFileError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsFileError(f"{what} {path}: is a directory") from None
    except PermissionError:
        raise TlsFileError(f"{what} {path}: not readable (permission denied)") from None
    except OSError as exc:
        raise TlsFileError(f"{what} {path}: cannot be read: {exc.strerror or exc}") from None


def _certificates(path: str, data: bytes, what: str) -> list[Any]:
    from cryptography import x509
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsFileError(f"{what} {path}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)")
    return certs


def _subject(cert: Any) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _check_dates(path: str, cert: Any, now: datetime.datetime) -> None:
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if after < now:
        raise TlsFileError(f"certificate file {path}: the certificate ({_subject(cert)}) expired on "
                           f"{after:%Y-%m-%d %H:%M:%S} UTC")
    if before > now:
        raise TlsFileError(f"certificate file {path}: the certificate ({_subject(cert)}) is not valid before "
                           f"{before:%Y-%m-%d %H:%M:%S} UTC")


def _public_bytes(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(ALPN)
    return ctx


def server_context(cert_file: str, key_file: str, *, now: datetime.datetime | None = None
                   ) -> tuple[ssl.SSLContext, dict[str, Any]]:
    """A server context for one certificate and key, after checking them (TlsFileError);
    and what the admin API shows of it (subject, names, expiry)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert_pem = _read(cert_file, "certificate file")
    key_pem = _read(key_file, "key file")
    leaf = _certificates(cert_file, cert_pem, "certificate file")[0]
    _check_dates(cert_file, leaf, now)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsFileError(f"key file {key_file}: the key is encrypted with a passphrase; give it unencrypted "
                           "(readable by the proxy's user only)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        if "PRIVATE KEY-----" not in key_pem.decode("latin-1"):
            raise TlsFileError(f"key file {key_file}: no PEM private key in it "
                               "(expected -----BEGIN PRIVATE KEY-----)") from None
        raise TlsFileError(f"key file {key_file}: not a usable private key ({exc})") from None
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise TlsFileError(f"key file {key_file} does not match the certificate in {cert_file} "
                           f"({_subject(leaf)}): a key and a certificate of different pairs")
    ctx = _new_server_context()
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:  # (the files changed since they were read: the next check loads again)
        raise TlsFileError(f"certificate file {cert_file} / key file {key_file}: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsFileError(f"certificate file {cert_file} / key file {key_file}: {exc.strerror or exc}") from None
    return ctx, {"subject": _subject(leaf), "names": _dns_names(leaf),
                 "not_after": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _dns_names(cert: Any) -> list[str]:
    from cryptography import x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)]


def client_context(ca_file: str) -> ssl.SSLContext:
    """A client context that verifies servers against the CA certificates in ``ca_file``
    (TlsFileError when it has none or cannot be read), host names checked."""
    data = _read(ca_file, "CA file")
    _certificates(ca_file, data, "CA file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(ALPN)
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsFileError(f"CA file {ca_file}: {getattr(exc, 'reason', None) or exc}") from None
    return ctx


def _signature(paths: tuple[str, ...]) -> tuple[Any, ...]:
    """What tells that files changed: (device, inode, size, mtime) each, or the error."""
    out: list[Any] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            out.append(exc.errno)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


# -- one listener ------------------------------------------------------------------------------

class CertSet:
    """The contexts of one listener at one moment (see the module docstring)."""

    __slots__ = ("default", "exact", "wildcards", "info")

    def __init__(self, settings: config.ListenerTls) -> None:
        self.default, default_info = server_context(settings.cert_file, settings.key_file)
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcards: dict[str, ssl.SSLContext] = {}  # ".example.test" -> context
        self.info: dict[str, Any] = {"default": {"cert_file": settings.cert_file, **default_info},
                                     "certificates": []}
        for entry in settings.certificates:
            ctx, info = server_context(entry.cert_file, entry.key_file)
            for host in entry.hosts:
                if host.startswith("*."):
                    self.wildcards[host[1:]] = ctx
                else:
                    self.exact[host] = ctx
            self.info["certificates"].append({"hosts": list(entry.hosts), "cert_file": entry.cert_file, **info})

    def pick(self, name: str | None) -> ssl.SSLContext:
        """The context for a client asking for ``name`` (SNI; None: it asked for none)."""
        if not name:
            return self.default
        name = name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        if self.wildcards:
            i = name.find(".")
            while i > 0:  # the longest suffix first; at least one character before it
                ctx = self.wildcards.get(name[i:])
                if ctx is not None:
                    return ctx
                i = name.find(".", i + 1)
        return self.default


def _files(settings: config.ListenerTls) -> tuple[str, ...]:
    out = [settings.cert_file, settings.key_file]
    for entry in settings.certificates:
        out += (entry.cert_file, entry.key_file)
    return tuple(out)


class _Reloader:
    """Shared by listeners and upstreams: the files' signature, the debounce, the status."""

    kind = ""

    def __init__(self, name: str, files: tuple[str, ...], metrics: Metrics | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.files = files
        self.metrics = metrics
        self.clock = clock
        self.signature = self._seen = _signature(files)  # before reading: a change meanwhile reloads
        self._load()   # TlsFileError at start: the caller reports it and exits
        self.loaded_at = clock()
        self.error: str | None = None
        self.error_at: float | None = None

    def publish(self, name: str) -> None:
        """Name it as /metrics and /tls show it (a listener: its bound address)."""
        self.name = name
        if self.metrics is not None:
            self.metrics.tls_files_invalid[(self.kind, name)] = 1 if self.error else 0

    def check(self) -> bool:
        """Reload when the files changed and have stayed so since the last check; True
        when new contexts took effect."""
        sig = _signature(self.files)
        seen, self._seen = self._seen, sig
        if sig == self.signature or sig != seen:
            return False
        self.signature = sig
        try:
            self._load()
        except TlsFileError as exc:
            self.error, self.error_at = str(exc), self.clock()
            log.error("TLS %s %s: cannot reload (%s); the certificates loaded before stay in force",
                      self.kind, self.name, exc)
            self._count("error", 1)
            return False
        self.loaded_at = self.clock()
        if self.error is not None:
            log.info("TLS %s %s: files fixed and reloaded", self.kind, self.name)
        else:
            log.info("TLS %s %s: files changed, reloaded", self.kind, self.name)
        self.error = self.error_at = None
        self._count("ok", 0)
        return True

    def _count(self, result: str, invalid: int) -> None:
        m = self.metrics
        if m is not None:
            key = (self.kind, self.name, result)
            m.tls_reloads[key] = m.tls_reloads.get(key, 0) + 1
            m.tls_files_invalid[(self.kind, self.name)] = invalid

    def _load(self) -> None:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        return {"files": list(self.files), "loaded_at": round(self.loaded_at, 3), "error": self.error,
                "error_at": round(self.error_at, 3) if self.error_at is not None else None}


class TlsListener(_Reloader):
    """The TLS side of one entry listener (see the module docstring). Raises TlsFileError
    when its files cannot be used at start."""

    kind = "listener"

    def __init__(self, address: str, settings: config.ListenerTls, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.certs: CertSet
        super().__init__(address, _files(settings), metrics)
        ctx = _new_server_context()
        # The listener's own certificate is the default one of the first load; every
        # handshake is handed the current CertSet's context in the SNI callback, which
        # OpenSSL calls for every ClientHello (with None when it names no server).
        ctx.load_cert_chain(settings.cert_file, settings.key_file)
        ctx.sni_callback = self._sni
        self.context = ctx

    def _sni(self, sslobj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.certs.pick(name)

    def _load(self) -> None:
        self.certs = CertSet(self.settings)

    def status(self) -> dict[str, Any]:
        return {"listen": self.name, **self.certs.info, **super().status()}


class UpstreamTls(_Reloader):
    """Upstream TLS of one service: ``context`` (current) and ``server_name``."""

    kind = "upstream"

    def __init__(self, settings: config.UpstreamTls, domain: str, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.server_name = settings.server_name or f"{settings.service}.service.{domain.strip('.')}"
        self.context: ssl.SSLContext
        super().__init__(settings.service, (settings.ca_file,), metrics)

    def _load(self) -> None:
        self.context = client_context(self.settings.ca_file)

    def status(self) -> dict[str, Any]:
        return {"service": self.name, "ca_file": self.settings.ca_file, "server_name": self.server_name,
                **super().status()}
