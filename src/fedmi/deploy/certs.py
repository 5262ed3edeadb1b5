"""Key material for a deployment, made with the `cryptography` package.

- a certificate authority (`ca.pem`, `ca.key`): every site trusts the server through it;
- the server's TLS certificate (`server.pem`, `server.key`), signed by the CA, valid for the
  server's host names and IP addresses (TLS checks them);
- the operator's signing key (`operator.key`, server machine only; `operator.pub`, sent to every
  site with `ca.pem`): Ed25519, it signs each run's ticket (`fedmi.apps.tickets`);
- one key pair per site (`sites/NAME.key`, `sites/NAME.pub`): ECDSA P-384, the OpenSSH format
  Flower's SuperNode authentication reads. A site proves its identity by signing with its
  private key; the server admits only sites whose public key was enrolled.

Private keys are written readable by their owner only. Existing files are never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from fedmi.errors import FedmiError

SITE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_site_name(name: str) -> str:
    if not name or not set(name) <= SITE_NAME_CHARS or name.startswith("."):
        raise FedmiError(f"site name '{name}' must be letters, digits, '-', '_' or '.' (and not start with '.')")
    return name


def _write(path: Path, data: bytes, private: bool) -> None:
    # O_EXCL: an existing key is never replaced by accident (it would lock an enrolled site out).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmi federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out: Path, sites: Sequence[str], hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> list[Path]:
    """Write a CA, a server certificate for `hosts` and a key pair per site into `out`; the files written."""
    for s in sites:
        check_site_name(s)
    if len(set(sites)) != len(sites):
        raise FedmiError(f"site names repeat: {list(sites)}")
    if not hosts:
        raise FedmiError("give at least one host name or IP address for the server certificate")
    out = Path(out)
    planned = [out / f for f in ("ca.pem", "ca.key", "server.pem", "server.key", "operator.key", "operator.pub")]
    planned += [out / "sites" / f"{s}.{ext}" for s in sites for ext in ("key", "pub")]
    if existing := [p for p in planned if p.exists()]:
        raise FedmiError(f"{existing[0]} exists; certificates are never overwritten (choose another --out)")
    (out / "sites").mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_subject = _name("fedmi federation CA")
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    # The server's own commands and its ServerApp reach it on loopback: those names are always in.
    for h in dict.fromkeys([*hosts, "127.0.0.1", "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.key", _pem_key(server_key), private=True)
    operator = ed25519.Ed25519PrivateKey.generate()
    _write(out / "operator.key", operator.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()), private=True)
    _write(out / "operator.pub", operator.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), private=False)
    for s in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        _write(out / "sites" / f"{s}.key", private, private=True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(out / "sites" / f"{s}.pub", public + f" {s}\n".encode(), private=False)
    return planned
