"""The running gateway: its lifetime (`daemon`), what a reload changes (`reload`), the pipeline
from readings to commits (`pipeline`), the QMS disposition feed (`quality`), the driver registry
(`registry`) and systemd's notifications and watchdog (`systemd`)."""
