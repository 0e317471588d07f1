"""Operating the gateway: the local API, status and metrics, outbox operations, logs; and what
it tells the people who run the plant (reconciliation, the KPIs, exceptions by role)."""
