"""Released production orders from ERP to the MES: sources per ERP profile, the order book,
validation, and the MQTT publisher the forwarder engine runs (README: Orders from ERP to the
MES)."""
