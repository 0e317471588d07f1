"""The running gateway: its lifetime, the pipeline from readings to commits, systemd."""
