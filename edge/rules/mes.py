"""MES inputs that are not milestones of their own: an order's operation starting and ending on
a machine. They bind and unbind orders in the machine rules. (MES material consumption and lot
completion are milestones: they map straight onto the canonical `material.consumed` and
`lot.produced` events.)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from edge.config.models import OrderBinding
from edge.model.quantities import Quantity

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"


class OrderStarted(BaseModel):
    """MES started an operation of an order on a machine."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    machine_id: Annotated[str, Field(pattern=_ID, description="Machine the operation runs on.")]
    order_id: Annotated[str, Field(pattern=_ID, max_length=40)]
    operation: Annotated[str, Field(pattern=r"^\d{4}$")] = "0010"
    material: Annotated[str | None, Field(pattern=_ID, max_length=40)] = None
    lot_id: Annotated[str | None, Field(pattern=_ID, max_length=40)] = None
    planned_quantity: Quantity | None = None
    components: tuple[Annotated[str, Field(pattern=_ID)], ...] = Field(
        default=(),
        description="Materials every lot of this order must consume (its bill of "
        "materials): genealogy is complete when a produced lot names an input lot of each.",
    )
    occurred_at: AwareDatetime

    def binding(self) -> OrderBinding:
        return OrderBinding(
            order_id=self.order_id,
            operation=self.operation,
            material=self.material,
            lot_id=self.lot_id,
        )


class OrderEnded(BaseModel):
    """MES ended an operation of an order on a machine."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    machine_id: Annotated[str, Field(pattern=_ID)]
    order_id: Annotated[str, Field(pattern=_ID, max_length=40)]
    operation: Annotated[str | None, Field(pattern=r"^\d{4}$")] = None
    yield_quantity: Quantity | None = Field(
        None,
        description="Good units MES counted for the operation (reconciliation compares "
        "it with the machine's confirmations).",
    )
    scrap_quantity: Quantity | None = Field(
        None, description="Scrap MES counted for the operation."
    )
    occurred_at: AwareDatetime


MES_INPUT_MODELS: Final[Mapping[str, type[OrderStarted] | type[OrderEnded]]] = MappingProxyType(
    {"order.started": OrderStarted, "order.ended": OrderEnded}
)
