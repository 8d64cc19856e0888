"""The proxy's TLS certificate: generate a self-signed pair once, validate any pair.

Headset browsers are sent to the proxy's page to accept a self-signed
certificate, so the generated one carries the names and addresses a headset
may use for this host. Every problem is a StartFailed naming the file, never a
traceback; nothing existing is ever overwritten.

The generated pair lives in ``certs/`` under the install dir, a private
directory of ours (:func:`cxrd.system.private.ensure_private_dir`: a link or
another user's directory is refused, InvalidConfig), and its key is used only
when it is a plain file of ours that nobody else can read or write (as OpenSSH
treats its keys): one planted by someone else would let them read the
headsets' traffic. A pair of the user's own (``proxy.cert``/``proxy.key``) is
theirs to keep as they like.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cxrd import constants as C
from cxrd.errors import StartFailed
from cxrd.system import addresses
from cxrd.system.private import describe_user, ensure_private_dir

log = logging.getLogger(__name__)

VALID_DAYS = 365
RENEW_DAYS = 30  # a generated certificate this close to its end is replaced at start
KEY_BITS = 2048
COMMON_NAME = "localhost"


@dataclass(frozen=True)
class CertInfo:
    not_before: dt.datetime
    not_after: dt.datetime
    subject: str
    sans: tuple[str, ...]


def ensure_certificate(certs_dir: Path) -> tuple[Path, Path]:
    """(cert, key) in ``certs_dir``: reused when valid, generated when both are absent.

    A pair there that expires within :data:`RENEW_DAYS` (or has expired) is
    cxrd's own and is renewed (:func:`renew_certificate`).
    """
    ensure_certs_dir(certs_dir)
    cert = certs_dir / C.CERT_FILE
    key = certs_dir / C.KEY_FILE
    have_cert, have_key = cert.exists(), key.is_symlink() or key.exists()
    if have_cert and have_key:
        check_own_key(key, cert)
        if expires_soon(cert):
            renew_certificate(certs_dir)
        validate_pair(cert, key)
        return cert, key
    if have_cert or have_key:
        present, missing = (cert, key) if have_cert else (key, cert)
        raise StartFailed(
            f"{missing}: missing, but {present.name} is there; restore {missing.name}, "
            f"or remove {present} to have a new pair generated"
        )
    generate_pair(cert, key)
    return cert, key


def ensure_certs_dir(certs_dir: Path) -> None:
    """Make ``certs_dir`` or check it: a real directory of ours, 0700 (InvalidConfig if not)."""
    ensure_private_dir(certs_dir, "the certificate directory", "its private key")


def check_own_key(key: Path, cert: Path) -> None:
    """StartFailed naming ``key`` unless it is a plain file of ours that only we can use."""
    again = f"or remove {key} and {cert} to have a new pair generated"
    try:
        info = os.lstat(key)
    except OSError as exc:
        raise StartFailed(f"{key}: cannot read the private key: {_why(exc)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise StartFailed(
            f"{key} is a symbolic link; cxrd uses only a key file of its own there: "
            f"put your own pair in proxy.cert and proxy.key, {again}"
        )
    if info.st_uid != os.getuid():
        raise StartFailed(
            f"{key} belongs to {describe_user(info.st_uid)}, not to "
            f"{describe_user(os.getuid())}: cxrd does not use a key someone else put there; "
            f"{again}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise StartFailed(
            f"{key}: other users can read or change this private key (mode {mode:04o}); "
            f"cxrd uses it only when they cannot: chmod 600 {key}, {again}"
        )


def generate_pair(cert: Path, key: Path, *, days: int = VALID_DAYS) -> None:
    """Write a new self-signed RSA pair; the key is 0600 from its creation, never replaced."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_host_names()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(key, flags, stat.S_IRUSR | stat.S_IWUSR)
    except OSError as exc:
        raise StartFailed(f"{key}: cannot create the private key: {_why(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        partial = cert.with_name(cert.name + ".partial")
        partial.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        partial.chmod(0o644)  # public, but never writable by others, whatever the umask
        partial.replace(cert)
    except OSError as exc:
        key.unlink(missing_ok=True)
        raise StartFailed(f"{cert}: cannot write the certificate: {_why(exc)}") from None


def expires_soon(cert: Path, days: int = RENEW_DAYS) -> bool:
    """Whether ``cert`` ends within ``days`` (an unreadable one is for validate_pair)."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return False
    left = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    return left < dt.timedelta(days=days)


def renew_certificate(certs_dir: Path) -> tuple[Path, Path]:
    """Replace the generated pair in ``certs_dir`` with a new one, key first, each atomically.

    Headsets trusted the old certificate, not this one: they must open the
    certificate page again. Logged as a warning for that reason.
    """
    ensure_certs_dir(certs_dir)
    cert, key = certs_dir / C.CERT_FILE, certs_dir / C.KEY_FILE
    new_cert, new_key = cert.with_name(cert.name + ".new"), key.with_name(key.name + ".new")
    new_key.unlink(missing_ok=True)
    generate_pair(new_cert, new_key)
    try:
        new_key.replace(key)
        new_cert.replace(cert)
    except OSError as exc:
        raise StartFailed(f"{cert}: cannot replace the certificate: {_why(exc)}") from None
    log.warning(
        "renewed the proxy's certificate %s; headsets must accept it again "
        "(open https://<this host>:<port>/ on each)",
        cert,
    )
    return cert, key


def validate_pair(cert: Path, key: Path) -> CertInfo:
    """Check that the pair is readable, parseable, matching and current."""
    cert_pem = _read(cert, "certificate")
    key_pem = _read(key, "private key")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise StartFailed(f"{cert}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise StartFailed(f"{key}: the private key is encrypted; cxrd needs it plain") from None
    except (ValueError, UnsupportedAlgorithm):
        raise StartFailed(f"{key}: not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise StartFailed(f"{key}: this private key does not belong to the certificate {cert}")
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not_after <= now:
        raise StartFailed(f"{cert}: the certificate expired on {not_after:%Y-%m-%d %H:%M} UTC")
    if not_before > now:
        when = f"{not_before:%Y-%m-%d %H:%M} UTC"
        raise StartFailed(f"{cert}: the certificate is not valid before {when}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise StartFailed(f"{cert}: TLS cannot use this pair: {exc}") from None
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(name.value) for name in san)
    except x509.ExtensionNotFound:
        sans = ()
    return CertInfo(not_before, not_after, certificate.subject.rfc4514_string(), sans)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartFailed(f"{path}: cannot read the {what}: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _host_names() -> list[x509.GeneralName]:
    """localhost, loopback, this host's names and every address `cxrctl url` prints."""
    dns = ["localhost"]
    local = addresses.mdns_name()
    for name in (socket.gethostname(), socket.getfqdn(), local):
        if name and name not in dns and not _is_ip(name):
            dns.append(name)
    ips = ["127.0.0.1", "::1", *addresses.ipv4_addresses(), *addresses.global_ipv6_addresses()]
    unique = list(dict.fromkeys(ipaddress.ip_address(ip) for ip in ips))
    return [*(x509.DNSName(n) for n in dns), *(x509.IPAddress(a) for a in unique)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
