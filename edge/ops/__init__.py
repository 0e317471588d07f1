"""Operations: what the gateway tells the people who run the plant (reconciliation, KPIs,
exceptions by role)."""
