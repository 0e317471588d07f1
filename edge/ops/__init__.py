"""Operating the gateway: the local API, status and metrics, outbox operations, logs."""
