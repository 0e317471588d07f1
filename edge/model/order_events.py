"""Orders released by ERP, on their way to the MES: the data of `order.released`,
`order.changed` and `order.cancelled` (`ORDER_EVENT_MODELS`), a production order with its
routing (`OrderOperation`) and bill of materials (`OrderComponent`), its state in ERP
(`OrderStatus`) and its release version.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, ClassVar, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from edge.model.event_data import (
    _LOT_ID,
    _MATERIAL,
    _OPERATION,
    _ORDER_ID,
    _WORK_CENTER,
    EventData,
)
from edge.model.ids import EventType, Priority
from edge.model.quantities import Quantity, UtcDateTime

OrderStatus = Literal["released", "locked", "technically_completed", "closed", "deleted"]
"""An order's state in ERP as the plant needs it: released (MES may run it), locked (ERP
blocked it: MES must not start it), or one of the ends (technically completed, closed,
deleted or marked for deletion): MES must stop and forget it."""

FINISHED_ORDER_STATUSES: Final = frozenset({"technically_completed", "closed", "deleted"})


class OrderOperation(BaseModel):
    """One operation of a released order's routing, in sequence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation: Annotated[str, _OPERATION]
    work_center: Annotated[str | None, _WORK_CENTER] = None
    description: Annotated[str | None, Field(min_length=1, max_length=80)] = None
    quantity: Quantity | None = Field(
        default=None, description="Planned quantity of the operation, when ERP gives one."
    )


class OrderComponent(BaseModel):
    """One component (bill of materials item) the order consumes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    material: Annotated[str, _MATERIAL]
    quantity: Quantity = Field(description="Required quantity for the whole order.")
    operation: Annotated[str | None, _OPERATION] = None


class _OrderData(EventData):
    """A production order as ERP released it, with its routing and bill of materials."""

    PRIORITY: ClassVar[Priority] = Priority.BUSINESS

    order_id: Annotated[str, _ORDER_ID]
    material: Annotated[str, _MATERIAL]
    quantity: Quantity = Field(description="Total quantity to produce (positive).")
    bom_version: Annotated[
        str,
        Field(
            min_length=1,
            max_length=40,
            description="Version of the bill of materials or recipe "
            "the order was exploded with (SAP: ProductionVersion).",
        ),
    ]
    planned_lot: Annotated[str | None, _LOT_ID] = None
    operations: tuple[OrderOperation, ...] = Field(
        min_length=1, description="The routing's operations, numbers strictly ascending."
    )
    components: tuple[OrderComponent, ...] = Field(
        default=(), description="The bill of materials: what the order consumes."
    )
    status: OrderStatus = Field(description="The order's state in ERP.")
    version: int = Field(
        ge=1,
        description="Release version of this order: 1 at its "
        "release, one more at every change the MES must see. A consumer "
        "keeps the highest and ignores what is not higher.",
    )
    erp_changed_at: UtcDateTime = Field(description="ERP's last change time of the order.")

    @model_validator(mode="after")
    def _routing(self) -> Self:
        numbers = [op.operation for op in self.operations]
        if numbers != sorted(set(numbers)):
            raise ValueError(
                f"operations must be unique and in ascending order, got {', '.join(numbers)}"
            )
        if self.quantity.as_decimal() <= 0:
            raise ValueError("quantity must be positive")
        for component in self.components:
            if component.quantity.as_decimal() <= 0:
                raise ValueError(f"component {component.material}: quantity must be positive")
            if component.operation is not None and component.operation not in numbers:
                raise ValueError(
                    f"component {component.material} names operation "
                    f"{component.operation}, which the routing does not have"
                )
        return self


class OrderReleased(_OrderData):
    """ERP released a production order: MES may start it."""

    EVENT_TYPE: ClassVar[EventType] = "order.released"


class OrderChanged(_OrderData):
    """ERP changed a released order (quantity, routing, components, a lock...)."""

    EVENT_TYPE: ClassVar[EventType] = "order.changed"


class OrderCancelled(_OrderData):
    """ERP ended a released order (technically completed, closed, deleted): MES must not
    start it, and stops it if it runs."""

    EVENT_TYPE: ClassVar[EventType] = "order.cancelled"


ORDER_EVENT_MODELS: Final[Mapping[str, type[_OrderData]]] = MappingProxyType(
    {model.EVENT_TYPE: model for model in (OrderReleased, OrderChanged, OrderCancelled)}
)
