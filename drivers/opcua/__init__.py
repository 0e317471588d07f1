"""The OPC UA driver as a package: `nodes` (node ids as written in YAML), `values` (structure
selectors, sample values and quality, the buffer to the sink), `config` (the pydantic
`OpcUaConfig` and its tags), `trust_list` (server certificates under data_dir/pki), `client`
(an asyncua client set up and closed, errors in words), `driver` (`OpcUaDriver`: connect,
subscribe and serve, reconnecting through the shared availability loop), `subscription` (the
subscription, its monitored items and the watchers that end a session), `outcome` (how a
session ended, and the wait before the next), `restarts` (server restarts), and the technician
tools `browse` (`plantsync browse opcua`) and `trust` (`plantsync trust opcua`).
What the registry, the CLI, the benchmarks and the tests use is exported here."""

from drivers.opcua.browse import browse_main
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.nodes import NodeRef, portable_node_id
from drivers.opcua.subscription import SUBSCRIPTION_QUEUE
from drivers.opcua.trust import trust_main
from drivers.opcua.values import PendingSamples, plain_value, quality_of, sample_from

__all__ = [
    "SUBSCRIPTION_QUEUE",
    "NodeRef",
    "OpcUaConfig",
    "OpcUaDriver",
    "PendingSamples",
    "browse_main",
    "plain_value",
    "portable_node_id",
    "quality_of",
    "sample_from",
    "trust_main",
]
