"""The store-and-forward outbox: business events, the rule state that produced them, and their
delivery to each destination, in one SQLite file.

Everything that changes the database goes through one writer connection on one thread, and
through group commit: callers queue their work, and the writer runs all that has queued up (at
most `commit_max_rows` events, after an optional linger of `commit_interval`) as one transaction
with `synchronous=FULL`; what arrives meanwhile makes the next transaction. A
caller's `await` returns only once its work is durable, which is what lets a driver acknowledge
its source after the commit and never before.

An event routed to several destinations has one delivery row per destination. Deliveries leave
in commit order per partition key: `lease` offers only the oldest owed delivery of each key (its
head), so a failing head holds back its own key and no other. The heads are kept in memory,
one entry per (destination, key), built at open with a skip scan of an index and moved by the
same transactions that move the rows: leasing from a backlog of a million events costs what
leasing from ten does. A delivery row is deleted only on an acknowledged delivery, or moved to
dead letters by an explicit decision; the payload goes when no destination needs it, and a
journal row stays for the audit.

When the database reaches its disk budget, informational events are refused (and counted) and
business events wait: `commit` does not return until there is room, which is the back-pressure
that stops drivers from taking more input. A full disk is handled the same way. A database that
fails its integrity check at open is moved aside and replaced, and the alarm stays raised.

Each database has an `epoch`: random, made with the database and kept in it. The event ids the
gateway derives from its own state (counter totals, a configured order bound at time 0) carry
it, because that state starts again from nothing with a new database: without the epoch, a
database moved aside or deleted would let the next one reissue ids that receivers already hold
and would drop as duplicates.

Why not aiosqlite: it hops to its thread once per statement. Here a whole group-committed
transaction runs as one call on the writer thread, which is where SQLite's speed is.

The package, by job: `store` (`Outbox`: commit, lease, settle, the counts metrics read),
`records` (what goes in and comes out, and the stored enums), `heads` (the heads of partition
keys and the delivery-row SQL), `database` (opening, checking and recovering the file; one
group's transaction), `queries` (the row SQL of the store's other writes and reads), `reports`
(what the CLI and API show people), `schema` (migrations).
"""

from buffer.outbox.database import journal_hand_action
from buffer.outbox.records import (
    REJECTED_PAYLOAD_LIMIT,
    CommitResult,
    Delivery,
    DeliveryState,
    DestinationCounts,
    HandAction,
    LotStatus,
    LotStatusName,
    OutboxEvent,
    OutboxFull,
    OutboxStats,
    Priority,
    RejectedInput,
    Settlement,
)
from buffer.outbox.store import Outbox

__all__ = [
    "REJECTED_PAYLOAD_LIMIT",
    "CommitResult",
    "Delivery",
    "DeliveryState",
    "DestinationCounts",
    "HandAction",
    "LotStatus",
    "LotStatusName",
    "Outbox",
    "OutboxEvent",
    "OutboxFull",
    "OutboxStats",
    "Priority",
    "RejectedInput",
    "Settlement",
    "journal_hand_action",
]
