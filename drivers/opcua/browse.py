"""`plantsync browse opcua`: prints a server's address space with node ids in the portable
`nsu=` form, ready to copy into YAML.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.object_ids import ObjectIdNames
from asyncua.ua.uaerrors import UaStatusCodeError
from pydantic import (
    ValidationError,
)

from drivers.opcua.client import (
    SECURITY_POLICY,
    close_client,
    describe_error,
    load_structures,
    new_client,
)
from drivers.opcua.config import OpcUaSecurity
from drivers.opcua.nodes import NodeRef, make_node_id, portable_node_id
from drivers.opcua.trust_list import TrustList
from drivers.opcua.values import plain_value


def _browse_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantsync browse opcua",
        description="Print an OPC UA server's address space as a tree, with node ids in the "
        "portable nsu= form to copy into the driver's tags.",
    )
    parser.add_argument("--endpoint", required=True, help="opc.tcp://host:port")
    parser.add_argument("--depth", type=int, default=6, help="levels below the start node")
    parser.add_argument("--start", default="i=85", help="start node id (default: Objects)")
    parser.add_argument(
        "--standard",
        action="store_true",
        help="also expand the server's own namespace-0 objects (Server, Aliases, ...)",
    )
    parser.add_argument("--username", help="user name (default: anonymous)")
    parser.add_argument("--password", help="password for --username")
    parser.add_argument("--policy", choices=("None", *SECURITY_POLICY), default="None")
    parser.add_argument("--mode", choices=("None", "Sign", "SignAndEncrypt"), default="None")
    parser.add_argument("--certificate", type=Path, help="client certificate (DER or PEM)")
    parser.add_argument("--private-key", type=Path, help="client private key")
    parser.add_argument("--server-certificate", type=Path, help="pin the server certificate")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the gateway's data_dir: with a security policy, the server's certificate must be "
        "in its pki/trusted (plantsync trust opcua puts it there)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    return parser


def browse_main(argv: list[str] | None = None) -> int:
    """`plantsync browse opcua`: print the address space; 0, or 1 if it cannot connect."""
    parser = _browse_parser()
    args = parser.parse_args(argv)
    if args.depth < 0:
        parser.error("--depth must not be negative")
    try:
        security = OpcUaSecurity(
            policy=args.policy,
            mode=args.mode,
            certificate=args.certificate,
            private_key=args.private_key,
            server_certificate=args.server_certificate,
        )
        start = NodeRef.parse(args.start)
    except (ValidationError, ValueError) as exc:
        problems = (
            [str(error.get("ctx", {}).get("error", error["msg"])) for error in exc.errors()]
            if isinstance(exc, ValidationError)
            else [str(exc)]
        )
        parser.error("; ".join(problems))
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    return asyncio.run(_browse(args, security, start, sys.stdout))


async def _browse(
    args: argparse.Namespace, security: OpcUaSecurity, start: NodeRef, out: TextIO
) -> int:
    client: Client | None = None
    try:
        client = await new_client(
            args.endpoint,
            security,
            username=args.username,
            password=args.password,
            request_timeout=args.timeout,
            client_name="PlantSync Edge browse",
            trust=TrustList(args.data_dir / "pki") if args.data_dir else None,
        )
        await client.connect()
    except Exception as exc:
        reason = describe_error(exc, args.timeout, args.username, security)
        print(f"Cannot connect to {args.endpoint}: {reason}", file=sys.stderr)
        if client is not None:
            await close_client(client, within=args.timeout)
        return 1
    try:
        namespaces = await client.get_namespace_array()
        await load_structures(client, args.endpoint)
        tree = _Tree(client, namespaces, args.depth, args.standard, out)
        await tree.print_node(start.resolve(namespaces))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, LookupError) else describe_error(exc, args.timeout)
        print(f"Browsing {args.endpoint} failed: {reason}", file=sys.stderr)
        return 1
    finally:
        await close_client(client, within=args.timeout)
    return 0


class _Tree:
    """Prints one node per line: browse name, portable node id, class; for variables the data
    type and current value. Indented two spaces per level."""

    def __init__(
        self,
        client: Client,
        namespaces: Sequence[str],
        depth: int,
        standard: bool,
        out: TextIO,
    ) -> None:
        self.client = client
        self.namespaces = namespaces
        self.depth = depth
        self.standard = standard
        self.out = out
        self._type_names: dict[ua.NodeId, str] = {}

    async def print_node(self, node_id: ua.NodeId) -> None:
        node = self.client.get_node(node_id)
        name = await node.read_browse_name()
        node_class = await node.read_node_class()
        await self._print(node_id, name.Name, node_class, level=0)

    async def _print(
        self, node_id: ua.NodeId, name: str, node_class: ua.NodeClass, level: int
    ) -> None:
        line = f"{'  ' * level}{name}  {portable_node_id(node_id, self.namespaces)}  "
        line += node_class.name
        if node_class == ua.NodeClass.Variable:
            line += await self._variable_details(node_id)
        print(line, file=self.out)
        if level >= self.depth or node_class not in (ua.NodeClass.Object, ua.NodeClass.Variable):
            return
        if level > 0 and node_id.NamespaceIndex == 0 and not self.standard:
            return
        children = await self.client.get_node(node_id).get_children_descriptions()
        for child in children:
            child_id = make_node_id(
                child.NodeId.Identifier, child.NodeId.NamespaceIndex, child.NodeId.NodeIdType
            )
            await self._print(child_id, child.BrowseName.Name, child.NodeClass, level + 1)

    async def _variable_details(self, node_id: ua.NodeId) -> str:
        node = self.client.get_node(node_id)
        try:
            data_type = await self._type_name(await node.read_data_type())
            value = await node.read_value()
        except UaStatusCodeError as exc:
            return f"  ({ua.StatusCode(exc.code).name})"
        text = repr(plain_value(value))
        if len(text) > 60:
            text = text[:57] + "..."
        return f"  {data_type} = {text}"

    async def _type_name(self, data_type: ua.NodeId) -> str:
        if data_type not in self._type_names:
            if data_type.NamespaceIndex == 0 and isinstance(data_type.Identifier, int):
                name = ObjectIdNames.get(data_type.Identifier, data_type.to_string())
            else:
                name = (await self.client.get_node(data_type).read_browse_name()).Name
            self._type_names[data_type] = name
        return self._type_names[data_type]
