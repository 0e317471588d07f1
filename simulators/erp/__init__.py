"""ERP API simulator: a real HTTP peer that receives the gateway's CloudEvents offline.

It answers like the central ERP the gateway delivers milestones to, in two northbound
profiles, and misbehaves on purpose when told to, so retry, back-off, token refresh and
lookup-before-retry paths meet a real server. Run it with
``python -m simulators.erp --port 8480 --db erp.sqlite``; it prints
``erp-api listening on http://HOST:PORT`` once it accepts connections. Everything is kept
in the SQLite file (OAuth tokens and CSRF sessions live in memory only, like a restart of
the real systems would forget sessions).

Canonical profile: one structured CloudEvent per ``POST /api/events`` with an
``Idempotency-Key`` header (201 ``{"reference", "duplicate": false}``; a repeated key
answers 200 with the first reference and is counted, never stored twice), or a CloudEvents
batch on ``POST /api/events:batch`` keyed by each event's id (200, one outcome per event).
A new ``lot.produced`` event puts ``data.quantity`` of ``data.lot_id`` / ``data.material``
into quality-inspection stock; a new ``lot.disposition`` applies ``data.disposition``
(release: unrestricted, reject or hold: blocked) to that batch.

SAP S/4HANA profile (OData v2, JSON, no idempotency header). Every request body and
``$filter`` is checked against SAP's published metadata (``tests/fixtures/sap/*.json``, from
SAP's generated clients on npm; ``--sap-metadata DIR``): a property the entity set does not
have, a value of the wrong Edm type (a number for an Edm.Decimal string, a date not in
``/Date(ms)/``), a string longer than its MaxLength or a decimal beyond its precision and
scale answers 400 in SAP Gateway's error shape (``error.code``, ``error.message.value``,
``error.innererror.errordetails``), before anything is stored. Units are checked against a
standard unit table: ``ConfirmationUnit``/``EntryUnit`` take internal units (ST or PC, KG),
``...ISOCode`` take ISO codes (PCE, KGM); C62 or H87 are neither.

- ``API_PROD_ORDER_CONFIRMATION_2_SRV``: ``POST /ProdnOrdConf2`` creates a production order
  confirmation (201 ``{"d": {...}}``) and posts its goods movements
  (``to_ProdnOrdConfMatlDocItm``: 101 receipt, which needs ``GoodsMovementRefDocType`` F and
  a batch; into quality inspection with ``InventoryUsabilityCode`` "2", which opens an
  inspection lot of origin 04 for the batch, or adds to its open one; 261 issue);
  ``GET /ProdnOrdConf2?$filter=OrderID eq 'X' and ConfirmationText eq 'Y'`` (any string
  property, joined by ``and``) looks confirmations up; ``GET /ProdnOrdConf2(ConfirmationGroup=
  'G',ConfirmationCount='C')`` reads one. The same ConfirmationText posted twice makes two
  confirmations (``sap_duplicate_texts`` in ``/stats``), as SAP would.
- ``API_INSPECTIONLOT_SRV``: ``GET /A_InspectionLot?$filter=...`` finds inspection lots;
  ``POST /A_InspLotUsageDecision`` records the usage decision of one (keyed by
  ``InspectionLot``; catalog 3, selected set 01, code group 01, code A accepts and releases
  the batch's stock to unrestricted, R rejects and blocks it; an unknown lot, a decided lot,
  another plant or another code is a 400); ``GET /A_InspLotUsageDecision?$filter=...``.
- ``API_MATERIAL_DOCUMENT_SRV``: ``POST /A_MaterialDocumentHeader`` with
  ``GoodsMovementCode`` 03 and ``to_MaterialDocumentItem`` 261 items (order, internal
  ``EntryUnit``) issues stock; ``GET /A_MaterialDocumentItem?$filter=...`` looks items up.
- CSRF like SAP Gateway: a GET (or HEAD) with ``X-CSRF-Token: Fetch`` answers the token
  in ``X-CSRF-Token`` and a ``SAP_SESSIONID_S4H_100`` session cookie; a POST without that
  session's token is refused 403 with ``X-CSRF-Token: Required``.

OAuth2 client credentials: ``POST /oauth/token`` (form ``grant_type=client_credentials``
with ``client_id``/``client_secret``, or HTTP Basic) answers ``{"access_token",
"token_type": "Bearer", "expires_in"}``. With at least one ``--client ID:SECRET``, every
``/api/*`` and ``/sap/*`` request needs a valid unexpired ``Authorization: Bearer`` token
(401 with ``WWW-Authenticate: Bearer ...`` otherwise); without, nothing is checked.
The token endpoint itself is never faulted (no latency, outage or scripted status).

For tests (never behind a token or a fault): ``GET /events`` (``?type=``; each row's ``type``
is the short name, ``lot.produced`` for ``com.plantsync.edge.lot.produced.v1``), ``GET /stats``
(canonical received/unique/duplicates, fault and auth counters, SAP confirmations,
``sap_duplicate_texts``, usage decisions, ``issues_from_unreleased_batches``),
``GET /healthz``, ``GET /_sim/batches`` (``?material=``), ``GET /_sim/batches/{batch}``
(``?material=``), ``GET /_sim/sap/confirmations``, ``GET /_sim/sap/usage-decisions`` (each
with its inspection lot's material, batch and plant under ``_lot``),
``GET /_sim/sap/inspection-lots``, ``GET /_sim/sap/material-documents``,
``POST /_sim/reset`` (clears stored data and counters, not faults, tokens or sessions),
and ``GET``/``POST /_sim/faults`` with a JSON object of knobs:

- ``latency`` (s, every /api and /sap request), ``error_rate`` (0..1), ``error_status``,
  ``retry_after`` (s, sent with injected 429 and 503);
- ``outage_until`` (Unix time) or ``outage_seconds`` (from now): every /api and /sap
  request answers 503 with ``Retry-After`` (seconds left) until then; 0 ends it;
- ``status_sequence`` ([500, 429, 201, ...]): the next deliveries answer these statuses in
  turn without being processed; a 2xx entry lets that delivery through normally;
- ``drop_connection`` (N): the next N deliveries are cut off (connection closed, no answer,
  nothing processed); ``drop_response`` (N): the next N deliveries are processed, then
  the connection is closed without an answer (the ambiguous failure);
- ``expire_tokens_now`` (true): revoke every issued access token;
  ``invalidate_csrf`` (true): forget every CSRF session.

A delivery is a POST to /api/events, /api/events:batch, ProdnOrdConf2,
A_MaterialDocumentHeader or A_InspLotUsageDecision; knobs are applied in this order: latency,
outage, bearer token, CSRF token, drop_connection, status_sequence, error_rate. Command line
settings: ``--client ID:SECRET`` (repeatable), ``--token-ttl S``, ``--error-rate``,
``--error-status``, ``--retry-after``, ``--latency``, ``--outage-seconds``,
``--status-sequence 500,429,201``, ``--drop-connection N``, ``--drop-response N``,
``--log-requests``, ``--sap-metadata DIR``.

The package, by job: `canonical` (the canonical profile: CloudEvents checked and stored once
per key), `sap_metadata` (what SAP accepts: the published facts, Edm checks, body and
`$filter` parsing), `sap_services` (the OData services, SAP Gateway's response and error shape,
CSRF), `inventory` (batches and their stock), `store` (the SQLite tables), `faults` (the
knobs), `app` (the checks every request passes, OAuth2, test endpoints, the route table in
`create_app`, the command line). A new service is a module of its own whose handlers
`create_app` adds to the route table.
"""
