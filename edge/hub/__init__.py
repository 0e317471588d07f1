"""Beyond one plant: plant daemons publish to a NATS JetStream hub, central relays deliver
from it to ERP and QMS (README "Beyond one plant")."""
