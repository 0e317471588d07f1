"""`plantsync trust opcua`: shows the certificates a server offers and trusts the one a person
chose, journalled with who and why.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from asyncua.client.client import Client

from drivers.opcua.client import describe_error
from drivers.opcua.trust_list import CertificateFacts, TrustList

log = logging.getLogger(__name__)


def _trust_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantsync trust opcua",
        description="Show an OPC UA server's certificate (thumbprint, subject, application URI, "
        "validity) and, on your yes, add it to the gateway's trust list (data_dir/pki/trusted). "
        "Compare the thumbprint with the one the machine's own display or its builder gives "
        "you before you say yes.",
    )
    parser.add_argument("--endpoint", required=True, help="opc.tcp://host:port")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the plant config (its data_dir is used)")
    where.add_argument("--data-dir", type=Path, help="the gateway's data_dir")
    parser.add_argument(
        "--yes",
        action="store_true",
        help="trust without asking (only for a certificate checked already)",
    )
    parser.add_argument(
        "--reason",
        default="",
        help="why, for the hand-action journal (e.g. the ticket, or 'thumbprint "
        "checked with the machine builder')",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    return parser


TrustJournal = Callable[[Path, str, str], None]
"""Records a certificate trusted by hand: (data_dir, what was trusted, why)."""


def trust_main(
    argv: list[str] | None = None,
    *,
    answer: TextIO | None = None,
    data_dir_of: Callable[[Path], Path] | None = None,
    journal: TrustJournal | None = None,
) -> int:
    """`plantsync trust opcua`: 0 when the server's certificate is trusted (now or already),
    1 when it is not (declined, or the server cannot be reached). `data_dir_of` reads a plant
    config's data_dir and `journal` records the hand action: both given by the CLI, whose
    layer knows configs and the journal."""
    parser = _trust_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        if data_dir_of is None:
            parser.error("--config needs the plantsync command; give --data-dir")
        try:
            data_dir = data_dir_of(args.config)
        except Exception as exc:  # the config's own error, said as it is
            print(exc, file=sys.stderr)
            return 1
    else:
        data_dir = args.data_dir
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    try:
        certificates = asyncio.run(_server_certificates(args.endpoint, args.timeout))
    except Exception as exc:
        print(
            f"Cannot read the endpoints of {args.endpoint}: {describe_error(exc, args.timeout)}",
            file=sys.stderr,
        )
        return 1
    if not certificates:
        print(
            f"{args.endpoint} offers no endpoint with a certificate (security None only): "
            "there is nothing to trust.",
            file=sys.stderr,
        )
        return 1
    trust = TrustList(data_dir / "pki")
    trusted = trust.trusted_thumbprints()
    answer = answer or sys.stdin
    status = 0
    for der, offers in certificates.items():
        facts = CertificateFacts.of(der)
        print(f"Server certificate of {args.endpoint} (for {', '.join(offers)}):")
        print("\n".join(facts.lines()))
        if facts.thumbprint in trusted:
            print(f"Already trusted (in {trust.trusted}).")
            continue
        if not args.yes:
            print(
                "Trust this certificate? Compare the thumbprint first. [y/N] ", end="", flush=True
            )
            reply = answer.readline().strip().lower()
            if reply not in ("y", "yes"):
                print("Not trusted.")
                status = 1
                continue
        path = trust.trust(der)
        print(f"Trusted: {path}")
        if journal is not None:
            try:
                journal(
                    data_dir,
                    f"server certificate {facts.thumbprint} ({facts.subject}) of {args.endpoint}",
                    args.reason or "(no reason given)",
                )
            except Exception as exc:  # the trust stands; the journal says why it lacks it
                print(f"Trusted, but not journaled as a hand action: {exc}", file=sys.stderr)
        log.info(
            "Server certificate %s of %s trusted by hand.",
            facts.thumbprint,
            args.endpoint,
            extra={"endpoint": args.endpoint, "path": str(path)},
        )
    return status


async def _server_certificates(endpoint: str, request_timeout: float) -> dict[bytes, list[str]]:
    """The distinct certificates a server's endpoints carry, each with the policy and mode
    of the endpoints that carry it. Asks with security None (GetEndpoints needs none)."""
    client = Client(endpoint, timeout=request_timeout)
    endpoints = await client.connect_and_get_server_endpoints()
    found: dict[bytes, list[str]] = {}
    for described in endpoints:
        chain = described.ServerCertificate
        if not chain:
            continue
        der = _first_certificate(chain)
        offer = f"{described.SecurityPolicyUri.rsplit('#', 1)[-1]} {described.SecurityMode.name}"
        found.setdefault(der, []).append(offer)
    return found


def _first_certificate(chain: bytes) -> bytes:
    """The leaf certificate of a DER chain (certificates back to back): the first DER SEQUENCE,
    its length read from its header."""
    if len(chain) < 2 or chain[0] != 0x30:
        return chain
    if chain[1] & 0x80:
        size = chain[1] & 0x7F
        return chain[: 2 + size + int.from_bytes(chain[2 : 2 + size], "big")]
    return chain[: 2 + chain[1]]
