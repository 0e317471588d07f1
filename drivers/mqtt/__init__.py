"""The MQTT driver as a package: `topics` (topic filters and field mappings), `config` (the
pydantic `MqttConfig`, its topics and a sample entry), `client` (one paho connection handed over
to asyncio), `driver` (`MqttDriver`: connect and consume, acknowledging after the commit,
reconnecting through the shared availability loop; `to_reading`) and `doctor`
(`plantsync doctor mqtt`). What the registry, the pipeline, the CLI and the tests use is
exported here."""

from drivers.mqtt.client import set_credentials
from drivers.mqtt.config import SAMPLE_CONFIG, MqttConfig
from drivers.mqtt.doctor import check_broker_settings, doctor
from drivers.mqtt.driver import MqttDriver, to_reading

__all__ = [
    "SAMPLE_CONFIG",
    "MqttConfig",
    "MqttDriver",
    "check_broker_settings",
    "doctor",
    "set_credentials",
    "to_reading",
]
