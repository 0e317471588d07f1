"""The one explicit mapping from config types to the classes that implement them."""

from __future__ import annotations

from pathlib import Path

from drivers.base import Driver
from drivers.modbus import ModbusConfig, ModbusDriver
from drivers.mqtt import MqttConfig, MqttDriver
from drivers.opcua import OpcUaConfig, OpcUaDriver
from edge.config.models import DriverConfig


def create_driver(config: DriverConfig, data_dir: Path | None = None) -> Driver:
    """The driver for `config`; `data_dir` is where a driver keeps what it must remember
    across gateway restarts (the OPC UA server's StartTime, its certificate trust list)."""
    match config:
        case ModbusConfig():
            return ModbusDriver(config)
        case OpcUaConfig():
            return OpcUaDriver(config, data_dir=data_dir)
        case MqttConfig():
            return MqttDriver(config)
    raise ValueError(f"no driver for type {config.type!r}")  # pragma: no cover
