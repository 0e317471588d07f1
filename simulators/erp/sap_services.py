"""The SAP S/4HANA OData v2 services of the ERP simulator: production order confirmations,
inspection lots and usage decisions, material documents; responses and errors in SAP Gateway's
shape, and its CSRF protection (a token fetched per session cookie).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from simulators.erp.canonical import InvalidEvent
from simulators.erp.sap_metadata import (
    CONFIRMATION_KEY,
    CONFIRMATION_SERVICE,
    CONFIRMATION_SET,
    INSPECTION_LOT_SET,
    INSPECTION_SERVICE,
    MATERIAL_DOCUMENT_ITEM_SET,
    MATERIAL_DOCUMENT_ITEMS,
    MATERIAL_DOCUMENT_SERVICE,
    MATERIAL_DOCUMENT_SET,
    USAGE_DECISION_SET,
    ODataError,
    SapMetadata,
    bad_request,
    parse_confirmation,
    parse_filter,
    parse_material_document,
    parse_usage_decision,
)
from simulators.erp.store import EventStore
from simulators.http_common import (
    media_type,
    read_json,
)

JsonObject = dict[str, Any]

SAP_SESSION_COOKIE = "SAP_SESSIONID_S4H_100"
CSRF_HEADER = "X-CSRF-Token"

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class CsrfSessions:
    """SAP Gateway CSRF protection: one token per session cookie."""

    _tokens: dict[str, str] = field(default_factory=dict)

    def fetch(self, session: str | None) -> tuple[str, str]:
        """Return (session id, token): the session's own, or a new session's."""
        if session is not None and session in self._tokens:
            return session, self._tokens[session]
        session = secrets.token_urlsafe(24)
        token = base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._tokens[session] = token
        return session, token

    def valid(self, session: str | None, token: str | None) -> bool:
        if session is None or token is None:
            return False
        expected = self._tokens.get(session)
        return expected is not None and secrets.compare_digest(expected, token)

    def clear(self) -> None:
        self._tokens.clear()


def _odata_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"DataServiceVersion": "2.0", **(headers or {})}


def _odata_response(
    body: JsonObject, status: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=_odata_headers(headers))


def odata_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    # SAP Gateway's shape: code, message {lang, value}, and the details in innererror.
    detail = {
        "code": code,
        "message": message,
        "propertyref": "",
        "severity": "error",
        "target": "",
    }
    body = {
        "error": {
            "code": code,
            "message": {"lang": "en", "value": message},
            "innererror": {
                "transactionid": secrets.token_hex(16).upper(),
                "timestamp": datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
                "errordetails": [detail],
            },
        }
    }
    return _odata_response(body, status, headers)


async def _odata_body(request: Request) -> object:
    if media_type(request) != "application/json":
        raise ODataError(
            415, "SIM/UNSUPPORTED_MEDIA_TYPE", "send the entity as Content-Type application/json"
        )
    try:
        return await read_json(request, InvalidEvent)
    except InvalidEvent as exc:
        raise bad_request("INVALID_JSON", str(exc)) from exc


def _filtered(entities: list[JsonObject], terms: Sequence[tuple[str, str]]) -> list[JsonObject]:
    return [
        entity
        for entity in entities
        if all(str(entity.get(name, "")) == value for name, value in terms)
    ]


def _paged(entities: list[JsonObject], request: Request) -> list[JsonObject]:
    def number(option: str) -> int | None:
        text = request.query_params.get(option)
        if text is None:
            return None
        if not text.isdigit():
            raise bad_request("INVALID_OPTION", f"{option} must be a non-negative integer")
        return int(text)

    skip, top = number("$skip") or 0, number("$top")
    return entities[skip:] if top is None else entities[skip : skip + top]


def _check_format(request: Request) -> None:
    wanted = request.query_params.get("$format", "json")
    if wanted != "json":
        raise bad_request("INVALID_OPTION", f"$format={wanted} is not served here; use json")


def _service_url(request: Request, service: str) -> str:
    return str(request.base_url).rstrip("/") + service


def _confirmation_payload(entity: JsonObject, base: str, *, expand: bool) -> JsonObject:
    group, count = entity["ConfirmationGroup"], entity["ConfirmationCount"]
    uri = f"{base}/{CONFIRMATION_SET}(ConfirmationGroup='{group}',ConfirmationCount='{count}')"
    payload: JsonObject = {
        "__metadata": {
            "id": uri,
            "uri": uri,
            "type": "API_PROD_ORDER_CONFIRMATION_2_SRV.A_ProdnOrdConf2Type",
        },
        **{name: value for name, value in entity.items() if name != MATERIAL_DOCUMENT_ITEMS},
    }
    if not expand:
        payload[MATERIAL_DOCUMENT_ITEMS] = {
            "__deferred": {"uri": f"{uri}/{MATERIAL_DOCUMENT_ITEMS}"}
        }
        return payload
    results = []
    for item in entity[MATERIAL_DOCUMENT_ITEMS]:
        item_uri = (
            f"{base}/ProdnOrdConfMatlDocItm(ConfirmationGroup='{group}',"
            f"ConfirmationCount='{count}',MaterialDocument='{item['MaterialDocument']}',"
            f"MaterialDocumentItem='{item['MaterialDocumentItem']}',"
            f"MaterialDocumentYear='{item['MaterialDocumentYear']}')"
        )
        metadata = {
            "id": item_uri,
            "uri": item_uri,
            "type": "API_PROD_ORDER_CONFIRMATION_2_SRV.A_ProdnOrdConfMatlDocItmType",
        }
        results.append({"__metadata": metadata, **item})
    payload[MATERIAL_DOCUMENT_ITEMS] = {"results": results}
    return payload


def _keyed_payload(
    entity: JsonObject, base: str, entity_set: str, keys: Sequence[str], service: str
) -> JsonObject:
    predicate = ",".join(f"{key}='{entity[key]}'" for key in keys)
    uri = f"{base}/{entity_set}({predicate})"
    metadata = {"id": uri, "uri": uri, "type": f"{service}.{entity_set}Type"}
    return {"__metadata": metadata, **entity}


def _usage_decision_payload(entity: JsonObject, base: str) -> JsonObject:
    return _keyed_payload(
        entity, base, USAGE_DECISION_SET, ["InspectionLot"], "API_INSPECTIONLOT_SRV"
    )


def _inspection_lot_payload(entity: JsonObject, base: str) -> JsonObject:
    return _keyed_payload(
        entity, base, INSPECTION_LOT_SET, ["InspectionLot"], "API_INSPECTIONLOT_SRV"
    )


DOCUMENT_KEYS = ("MaterialDocumentYear", "MaterialDocument")


def _material_document_payload(entity: JsonObject, base: str) -> JsonObject:
    header = {k: v for k, v in entity.items() if k != "to_MaterialDocumentItem"}
    payload = _keyed_payload(
        header, base, MATERIAL_DOCUMENT_SET, DOCUMENT_KEYS, "API_MATERIAL_DOCUMENT_SRV"
    )
    payload["to_MaterialDocumentItem"] = {
        "results": [
            _material_document_item_payload(item, base)
            for item in entity["to_MaterialDocumentItem"]
        ]
    }
    return payload


def _material_document_item_payload(item: JsonObject, base: str) -> JsonObject:
    return _keyed_payload(
        item,
        base,
        MATERIAL_DOCUMENT_ITEM_SET,
        [*DOCUMENT_KEYS, "MaterialDocumentItem"],
        "API_MATERIAL_DOCUMENT_SRV",
    )


class SapServices:
    """The SAP services' request handlers over the simulator's store."""

    def __init__(
        self, store: EventStore, metadata: SapMetadata, say: Callable[[str], None]
    ) -> None:
        self.store = store
        self.metadata = metadata
        self._say = say

    def service_document(self, *entity_sets: str) -> Endpoint:
        async def document(request: Request) -> Response:
            _check_format(request)
            return _odata_response({"d": {"EntitySets": list(entity_sets)}})

        return document

    def _terms(self, request: Request, service: str, entity_set: str) -> list[tuple[str, str]]:
        _check_format(request)
        expression = request.query_params.get("$filter", "").strip()
        terms = parse_filter(expression) if expression else []
        self.metadata.check_filter(service, entity_set, terms)
        return terms

    async def create_confirmation(self, request: Request) -> Response:
        fields = parse_confirmation(self.metadata, await _odata_body(request))
        entity = self.store.create_confirmation(fields, request.state.user)
        self._say(
            f"SAP confirmation {entity['ConfirmationGroup']}/{entity['ConfirmationCount']}"
            f" order={entity['OrderID']} op={entity['OrderOperation']}"
            f" yield={entity['ConfirmationYieldQuantity']}"
            f" scrap={entity['ConfirmationScrapQuantity']}"
            f" {entity.get('ConfirmationUnitISOCode', '')}"
            f" posting={entity.get('PostingDate', 'today')} text={entity['ConfirmationText']}"
        )
        payload = _confirmation_payload(
            entity, _service_url(request, CONFIRMATION_SERVICE), expand=True
        )
        return _odata_response({"d": payload}, 201, {"Location": payload["__metadata"]["uri"]})

    async def list_confirmations(self, request: Request) -> Response:
        terms = self._terms(request, CONFIRMATION_SERVICE, CONFIRMATION_SET)
        indexed = dict(terms)
        entities = self.store.confirmations(
            text=indexed.get("ConfirmationText"), order_id=indexed.get("OrderID")
        )
        entities = _paged(_filtered(entities, terms), request)
        expand = MATERIAL_DOCUMENT_ITEMS in request.query_params.get("$expand", "").split(",")
        base = _service_url(request, CONFIRMATION_SERVICE)
        results = [_confirmation_payload(entity, base, expand=expand) for entity in entities]
        return _odata_response({"d": {"results": results}})

    async def get_confirmation(self, request: Request) -> Response:
        _check_format(request)
        key = CONFIRMATION_KEY.match(request.path_params["key"])
        found = (
            self.store.confirmations(key=(key.group(1), key.group(2))) if key is not None else []
        )
        if not found:
            raise ODataError(404, "SIM/NOT_FOUND", "Resource not found for segment ProdnOrdConf2")
        expand = MATERIAL_DOCUMENT_ITEMS in request.query_params.get("$expand", "").split(",")
        base = _service_url(request, CONFIRMATION_SERVICE)
        return _odata_response({"d": _confirmation_payload(found[0], base, expand=expand)})

    async def list_inspection_lots(self, request: Request) -> Response:
        terms = self._terms(request, INSPECTION_SERVICE, INSPECTION_LOT_SET)
        entities = _paged(_filtered(self.store.inspection_lots(), terms), request)
        base = _service_url(request, INSPECTION_SERVICE)
        return _odata_response(
            {"d": {"results": [_inspection_lot_payload(entity, base) for entity in entities]}}
        )

    async def create_usage_decision(self, request: Request) -> Response:
        fields, target = parse_usage_decision(self.metadata, await _odata_body(request))
        entity = self.store.create_usage_decision(fields, request.state.user, target)
        self._say(
            f"SAP usage decision {entity['InspectionLotUsageDecisionCode']}"
            f" (set {entity['InspLotUsgeDcsnSelectedSet']}, group"
            f" {entity['InspLotUsageDecisionCodeGroup']}) inspection lot"
            f" {entity['InspectionLot']}: stock {target}"
        )
        payload = _usage_decision_payload(entity, _service_url(request, INSPECTION_SERVICE))
        return _odata_response({"d": payload}, 201, {"Location": payload["__metadata"]["uri"]})

    async def list_usage_decisions(self, request: Request) -> Response:
        terms = self._terms(request, INSPECTION_SERVICE, USAGE_DECISION_SET)
        entities = _paged(_filtered(self.store.usage_decisions(), terms), request)
        base = _service_url(request, INSPECTION_SERVICE)
        results = [_usage_decision_payload(entity, base) for entity in entities]
        return _odata_response({"d": {"results": results}})

    async def create_material_document(self, request: Request) -> Response:
        fields = parse_material_document(self.metadata, await _odata_body(request))
        entity = self.store.create_material_document(fields, request.state.user)
        items = entity["to_MaterialDocumentItem"]
        self._say(
            f"SAP material document {entity['MaterialDocument']}/{entity['MaterialDocumentYear']}"
            f" goods issue: "
            + ", ".join(
                f"{item['QuantityInEntryUnit']} {item['EntryUnit']} {item['Material']}"
                f" batch {item.get('Batch') or '-'} to order {item['ManufacturingOrder']}"
                for item in items
            )
        )
        payload = _material_document_payload(
            entity, _service_url(request, MATERIAL_DOCUMENT_SERVICE)
        )
        return _odata_response({"d": payload}, 201, {"Location": payload["__metadata"]["uri"]})

    async def list_material_document_items(self, request: Request) -> Response:
        terms = self._terms(request, MATERIAL_DOCUMENT_SERVICE, MATERIAL_DOCUMENT_ITEM_SET)
        items = [
            item
            for header in self.store.material_documents()
            for item in header["to_MaterialDocumentItem"]
        ]
        base = _service_url(request, MATERIAL_DOCUMENT_SERVICE)
        results = [
            _material_document_item_payload(item, base)
            for item in _paged(_filtered(items, terms), request)
        ]
        return _odata_response({"d": {"results": results}})
