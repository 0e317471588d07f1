"""OPC UA node ids as technicians write them in YAML: `ns=2;s=...` or `nsu=<namespace uri>;i=...`
(the portable form, resolved against the server's namespace array at every connect), and back.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from asyncua import ua

_NODE_ID = re.compile(
    r"(?:nsu=(?P<uri>[^;]+);|ns=(?P<index>\d+);)?(?P<kind>[isgb])=(?P<identifier>.+)", re.DOTALL
)
_KIND_TYPE = {
    "i": ua.NodeIdType.Numeric,
    "s": ua.NodeIdType.String,
    "g": ua.NodeIdType.Guid,
    "b": ua.NodeIdType.ByteString,
}


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A node id as written in YAML, before it meets a server.

    `namespace` is a namespace URI (`nsu=`, portable across servers and restarts) or an index
    (`ns=`, valid only for the server's current namespace array); no prefix means namespace 0.
    """

    namespace: str | int
    kind: Literal["i", "s", "g", "b"]
    identifier: int | str | uuid.UUID | bytes

    @classmethod
    def parse(cls, text: str) -> NodeRef:
        """Parse `nsu=<uri>;s=...`, `ns=2;s=...`, `i=85`, `g=<uuid>` or `b=<base64>`."""
        match = _NODE_ID.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"{text!r} is not a node id such as nsu=urn:example;s=Line1.Speed, "
                "ns=2;s=Line1.Speed or i=2258"
            )
        namespace: str | int = match["uri"] if match["uri"] else int(match["index"] or 0)
        raw = match["identifier"]
        identifier: int | str | uuid.UUID | bytes
        match match["kind"]:
            case "i":
                if not raw.isdigit() or int(raw) > 0xFFFFFFFF:
                    raise ValueError(f"{text!r}: a numeric identifier is 0 to 4294967295")
                identifier = int(raw)
            case "g":
                try:
                    identifier = uuid.UUID(raw)
                except ValueError:
                    raise ValueError(f"{text!r}: {raw!r} is not a GUID") from None
            case "b":
                try:
                    identifier = base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError):
                    raise ValueError(f"{text!r}: {raw!r} is not base64") from None
            case _:
                identifier = raw
        return cls(namespace, match["kind"], identifier)  # type: ignore[arg-type]

    def resolve(self, namespaces: Sequence[str]) -> ua.NodeId:
        """The NodeId on a server with this namespace array; LookupError if the URI is absent."""
        if isinstance(self.namespace, str):
            try:
                index = list(namespaces).index(self.namespace)
            except ValueError:
                raise LookupError(f"the server has no namespace {self.namespace!r}") from None
        else:
            index = self.namespace
        return make_node_id(self.identifier, index, _KIND_TYPE[self.kind])


def make_node_id(identifier: object, namespace_index: int, kind: ua.NodeIdType) -> ua.NodeId:
    """A NodeId from plain Python values (asyncua annotates its own int and str subclasses)."""
    return ua.NodeId(cast(Any, identifier), cast(Any, namespace_index), kind)


def portable_node_id(node_id: ua.NodeId, namespaces: Sequence[str]) -> str:
    """`nsu=<uri>;s=...` for a node outside namespace 0, `i=85` style inside it."""
    local = make_node_id(node_id.Identifier, 0, node_id.NodeIdType).to_string()
    index = node_id.NamespaceIndex
    if index == 0:
        return local
    if index < len(namespaces):
        return f"nsu={namespaces[index]};{local}"
    return node_id.to_string()
