"""Key material for the hub's authentication tests, made fresh in each test: NATS user NKeys,
an operator/account/user JWT chain with the user's `.creds` file, and a CA with a server
certificate for 127.0.0.1.

NKeys come from the `nkeys` package (the one nats-py signs with): a seed is
base32(prefix bytes + 32 random bytes + CRC16), per the NKeys spec
(https://docs.nats.io/running-a-nats-service/configuration/securing_nats/auth_intro/nkey_auth,
source github.com/nats-io/nkeys). The JWTs are made by hand as the NATS JWT v2 library
(github.com/nats-io/jwt, v2/claims.go, header.go) makes them: header
`{"typ":"JWT","alg":"ed25519-nkey"}`, claims with `iss` (the signer's public key), `sub`,
`iat`, `jti` and a `nats` object naming the `type` and `version: 2`, signed with ed25519 over
`base64url(header).base64url(claims)` by the issuer's NKey. The creds file is the layout `nsc`
writes (`nsc generate creds`). Certificates come from `cryptography`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class NKey:
    seed: str
    public: str

    @classmethod
    def new(cls, prefix: int) -> NKey:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        public = nkeys.from_seed(bytearray(seed)).public_key.decode()
        return cls(seed.decode(), public)

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(bytearray(self.seed.encode())).sign(data))


def user_nkey() -> NKey:
    return NKey.new(nkeys.PREFIX_BYTE_USER)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(issuer: NKey, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2) for `subject`, signed by `issuer`."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    # jti: base32 of the SHA-512/256 of the claims without it, as the JWT library sets it.
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


@dataclass(frozen=True)
class Operator:
    """Decentralized auth: an operator, one account with JetStream, one user of it."""

    operator: NKey
    system: NKey
    account: NKey
    user: NKey
    operator_jwt: str
    system_jwt: str
    account_jwt: str
    user_jwt: str

    @classmethod
    def new(cls) -> Operator:
        operator = NKey.new(nkeys.PREFIX_BYTE_OPERATOR)
        system = NKey.new(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs the server's own
        account = NKey.new(nkeys.PREFIX_BYTE_ACCOUNT)
        user = user_nkey()
        unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
        return cls(
            operator,
            system,
            account,
            user,
            jwt(
                operator,
                operator.public,
                "hub-operator",
                {"type": "operator", "system_account": system.public},
            ),
            jwt(operator, system.public, "SYS", {"type": "account", "limits": unlimited}),
            jwt(
                operator,
                account.public,
                "plants",
                {
                    "type": "account",
                    "limits": {
                        **unlimited,
                        "wildcards": True,
                        "conn": -1,
                        "leaf": -1,
                        # JetStream is on for an account whose storage limits are not 0.
                        "mem_storage": -1,
                        "disk_storage": -1,
                        "streams": -1,
                        "consumer": -1,
                    },
                },
            ),
            jwt(
                account,
                user.public,
                "plant",
                {"type": "user", "pub": {}, "sub": {}, **unlimited},
            ),
        )

    def server_config(self) -> str:
        """nats-server settings: operator mode, the account preloaded in a memory resolver."""
        return (
            f'operator: "{self.operator_jwt}"\nsystem_account: {self.system.public}\n'
            "resolver: MEMORY\n"
            f'resolver_preload: {{ {self.system.public}: "{self.system_jwt}", '
            f'{self.account.public}: "{self.account_jwt}" }}\n'
        )

    def creds(self, path: Path, user_jwt: str | None = None, seed: str | None = None) -> Path:
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{user_jwt or self.user_jwt}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{seed or self.user.seed}\n"
            "------END USER NKEY SEED------\n\n"
            "*************************************************************\n"
        )
        path.chmod(0o600)
        return path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@dataclass(frozen=True)
class Certificates:
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path


def certificates(directory: Path, name: str = "hub") -> Certificates:
    """A CA of its own, a server certificate it signed for 127.0.0.1 and localhost, and a
    client certificate (for mutual TLS)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} test CA"))
        .issuer_name(_name(f"{name} test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key, cert = _leaf(ca_key, ca, f"{name}.test", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
    client_key, client = _leaf(ca_key, ca, "plant-7070", x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    files = Certificates(
        directory / f"{name}-ca.pem",
        directory / f"{name}.pem",
        directory / f"{name}-key.pem",
        directory / "client.pem",
        directory / "client-key.pem",
    )
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for path, certificate in ((files.cert_file, cert), (files.client_cert_file, client)):
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    for path, private in ((files.key_file, key), (files.client_key_file, client_key)):
        path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
    return files


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    common: str,
    usage: x509.ObjectIdentifier,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and its certificate signed by the CA, for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert
