"""The Modbus driver as a package: `config` (the pydantic `ModbusConfig` and its tags), `client`
(read planning, decoding, one request on the wire), `driver` (`ModbusDriver`: connect and poll,
reconnecting through the shared availability loop) and `probe` (`plantsync probe modbus`).
What the registry, the CLI and the tests use is exported here."""

from drivers.modbus.client import (
    ReadBlock,
    decode,
    decode_string,
    plan_poll_groups,
    plan_reads,
    tag_value,
)
from drivers.modbus.config import REGISTER_WIDTH, ModbusConfig, ModbusTag
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.probe import probe_main

__all__ = [
    "REGISTER_WIDTH",
    "ModbusConfig",
    "ModbusDriver",
    "ModbusTag",
    "ReadBlock",
    "decode",
    "decode_string",
    "plan_poll_groups",
    "plan_reads",
    "probe_main",
    "tag_value",
]
