"""The one explicit mapping from config types to the classes that implement them."""

from __future__ import annotations

from drivers.base import Driver
from drivers.modbus import ModbusConfig, ModbusDriver
from drivers.mqtt import MqttConfig, MqttDriver
from drivers.opcua import OpcUaConfig, OpcUaDriver
from edge.config import DriverConfig


def create_driver(config: DriverConfig) -> Driver:
    match config:
        case ModbusConfig():
            return ModbusDriver(config)
        case OpcUaConfig():
            return OpcUaDriver(config)
        case MqttConfig():
            return MqttDriver(config)
    raise ValueError(f"no driver for type {config.type!r}")  # pragma: no cover
