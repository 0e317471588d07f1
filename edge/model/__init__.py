"""The canonical model: the one shape every business milestone takes between rules and targets.

A milestone is a CloudEvents 1.0 event in structured JSON mode (`CloudEvent`) whose `data` is
validated by a versioned pydantic model per event type (`EVENT_MODELS`); the models' JSON Schemas
are exported so that ERP and QMS teams can check payloads without reading Python. Quantities are
decimal strings with a UN/ECE Recommendation 20 unit code, never floats, so that ERP, MES and QMS
add up to the same number. An event's id is a UUIDv5 over its natural key, never random and never
time based: deriving it again after a crash gives the same id, which is what lets the outbox and
the receivers drop duplicates. Natural keys come in two kinds (`source_key`, `state_key`): what
a source system names (an MES message id, a lot id, a QMS decision) and what the gateway derives
from its own state, which carries the outbox's epoch so that a new outbox never reissues an id.
Nothing here does I/O except `write_schemas`, and nothing here keeps mutable state at package
level: extra unit codes come from configuration through the pydantic validation context (key
`UOM_CODES_CONTEXT_KEY`).

Ids and keys are in `ids`, unit codes in `codes`, value types in `quantities`, the data models
in `events`, the CloudEvents envelope in `envelope`, the JSON Schema export in `schemas`.
"""
