"""The trust list of server certificates, as files under the gateway's `data_dir/pki`: a server
whose certificate is not trusted is refused, and its certificate is kept under `rejected/`
so that a person can trust it (`plantsync trust opcua`, or by moving the file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

log = logging.getLogger(__name__)


class UntrustedCertificate(Exception):
    """The server's certificate is not in the trust list (or no longer valid); the message
    says which file to move to trust it."""


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What a technician checks before trusting a server certificate."""

    thumbprint: str
    """SHA-1 of the DER, upper-case hex: what UaExpert and most servers show."""
    sha256: str
    subject: str
    issuer: str
    application_uri: str | None
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, der: bytes) -> CertificateFacts:
        cert = x509.load_der_x509_certificate(der)
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        return cls(
            thumbprint=hashlib.sha1(der).hexdigest().upper(),  # a name, not a MAC
            sha256=hashlib.sha256(der).hexdigest().upper(),
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            application_uri=uris[0] if uris else None,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    @property
    def file_name(self) -> str:
        """`<common name> [<thumbprint>].der`, as UaExpert names its PKI files."""
        common = (
            self.subject.split("CN=", 1)[1].split(",", 1)[0] if "CN=" in self.subject else "server"
        )
        safe = re.sub(r"[^A-Za-z0-9._ -]", "_", common).strip(" .") or "server"
        return f"{safe[:64]} [{self.thumbprint}].der"

    def lines(self) -> list[str]:
        return [
            f"  subject:         {self.subject}",
            f"  issuer:          {self.issuer}"
            + ("  (self-signed)" if self.issuer == self.subject else ""),
            f"  application URI: {self.application_uri or '(none)'}",
            f"  valid:           {self.not_before:%Y-%m-%d %H:%M} to "
            f"{self.not_after:%Y-%m-%d %H:%M} UTC",
            f"  thumbprint:      {self.thumbprint} (SHA-1)",
            f"  SHA-256:         {self.sha256}",
        ]


@dataclass(frozen=True, slots=True)
class TrustList:
    """Server certificates the gateway trusts, one file each (DER or PEM) in `trusted/`; one it
    met and refused is saved in `rejected/` for a person to judge, as UaExpert and open62541
    keep theirs. Moving a file from rejected/ to trusted/ is how a certificate is trusted."""

    root: Path

    @property
    def trusted(self) -> Path:
        return self.root / "trusted"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    def trusted_thumbprints(self) -> set[str]:
        found: set[str] = set()
        if not self.trusted.is_dir():
            return found
        for path in sorted(self.trusted.iterdir()):
            try:
                data = path.read_bytes()
                der = (
                    x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
                    if data.lstrip().startswith(b"-----")
                    else data
                )
                found.add(CertificateFacts.of(der).thumbprint)
            except (OSError, ValueError) as exc:
                log.warning(
                    "Trust list: %s is not a certificate (%s); ignored.",
                    path,
                    exc,
                    extra={"path": str(path)},
                )
        return found

    def check(self, der: bytes, endpoint: str) -> None:
        """Return if `der` is trusted and valid now; else save it in rejected/ and raise."""
        facts = CertificateFacts.of(der)
        if facts.thumbprint in self.trusted_thumbprints():
            now = datetime.now(UTC)
            if not facts.not_before <= now <= facts.not_after:
                raise UntrustedCertificate(
                    f"the server's certificate {facts.thumbprint} ({facts.subject}) is trusted "
                    f"but not valid now (valid {facts.not_before:%Y-%m-%d} to "
                    f"{facts.not_after:%Y-%m-%d}): the server needs a new certificate"
                )
            return
        saved = self.rejected / facts.file_name
        try:
            self.rejected.mkdir(parents=True, exist_ok=True)
            if not saved.exists():
                saved.write_bytes(der)
        except OSError as exc:
            saved_note = f"(could not save it in {self.rejected}: {exc})"
        else:
            saved_note = f"saved as {saved}"
        raise UntrustedCertificate(
            f"the server's certificate is not trusted: {facts.subject}, application URI "
            f"{facts.application_uri or '(none)'}, thumbprint {facts.thumbprint}; {saved_note}. "
            f"If this is the right server, move that file to {self.trusted}/ (or run: "
            f"plantsync trust opcua --endpoint {endpoint}); if the server should not have a "
            "new certificate, someone may be impersonating it"
        )

    def trust(self, der: bytes) -> Path:
        """Put `der` in trusted/ (and out of rejected/); return its path."""
        facts = CertificateFacts.of(der)
        self.trusted.mkdir(parents=True, exist_ok=True)
        path = self.trusted / facts.file_name
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(der)
        os.replace(temporary, path)
        (self.rejected / facts.file_name).unlink(missing_ok=True)
        return path
