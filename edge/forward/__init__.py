"""Northbound delivery: the forwarder engine, authentication, and one profile per kind of
target (canonical CloudEvents, SAP S/4HANA OData, a generic REST QMS)."""

from edge.forward.forwarder import Circuit, HttpForwarder
from edge.forward.outcome import Outcome, Result, classify, parse_retry_after

__all__ = ["Circuit", "HttpForwarder", "Outcome", "Result", "classify", "parse_retry_after"]
