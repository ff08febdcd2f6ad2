"""Throwaway X.509 certificates for TLS tests, made at test time with ``cryptography``.

* ``Authority(name)``: a CA (``cert_pem``, ``write(dir) -> ca file``) that ``issue``s
  certificates: ``ca.issue(dir, "web", ["www.a.test", "*.b.test"])`` writes
  ``web.pem`` (the certificate, then the CA's) and ``web.key`` and returns their paths.
* ``self_signed(dir, name, hosts)``: the same without a CA (the certificate is its own).
* Options: ``days`` (validity from now; negative: expired), ``not_before_days``
  (a certificate not valid yet), ``key`` (reuse a key: certificate and key of different
  pairs are made by passing another pair's key file to the caller), ``ips`` (IP SANs).

EC P-256 keys: made in about a millisecond, so each test can have its own.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Authority", "self_signed", "new_key", "key_pem"]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _build(subject: str, hosts: Sequence[str], key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
           issuer_key: ec.EllipticCurvePrivateKey | None, *, days: float, not_before_days: float, ca: bool,
           ips: Sequence[str]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now + datetime.timedelta(days=not_before_days) if not_before_days else now - datetime.timedelta(hours=1)
    end = now + datetime.timedelta(days=days)
    if end <= start:
        start = end - datetime.timedelta(days=30)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer or _name(subject))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Authority:
    """A certificate authority for one test."""

    def __init__(self, name: str = "meshlet test CA") -> None:
        self.key = new_key()
        self.cert = _build(name, [], self.key, None, None, days=30, not_before_days=0, ca=True, ips=())
        self.cert_pem = _pem(self.cert)

    def write(self, directory: Path, name: str = "ca") -> Path:
        path = Path(directory) / f"{name}.pem"
        path.write_bytes(self.cert_pem)
        return path

    def issue(self, directory: Path, name: str, hosts: Sequence[str], *, days: float = 30,
              not_before_days: float = 0, key: ec.EllipticCurvePrivateKey | None = None,
              ips: Sequence[str] = ()) -> tuple[Path, Path]:
        key = key or new_key()
        cert = _build(hosts[0] if hosts else name, hosts, key, self.cert.subject, self.key, days=days,
                      not_before_days=not_before_days, ca=False, ips=ips)
        return _write(Path(directory), name, _pem(cert) + self.cert_pem, key)


def self_signed(directory: Path, name: str, hosts: Sequence[str], *, days: float = 30,
                not_before_days: float = 0, key: ec.EllipticCurvePrivateKey | None = None,
                ips: Sequence[str] = ()) -> tuple[Path, Path]:
    key = key or new_key()
    cert = _build(hosts[0] if hosts else name, hosts, key, None, None, days=days,
                  not_before_days=not_before_days, ca=False, ips=ips)
    return _write(Path(directory), name, _pem(cert), key)


def _write(directory: Path, name: str, cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path
