"""What every config section shares: the strict base (unknown keys are errors) and the retry
and circuit-breaker settings used by the destinations and the MES order publisher."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from drivers.common.timing import Duration


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CircuitBreaker(Strict):
    failures: int = Field(5, ge=1, description="Consecutive failed attempts that open it.")
    open_for: Duration = Field(
        30.0,
        description="How long it stays open (no requests) before one probe is let "
        "through; the probe's success closes it.",
    )


class RetryPolicy(Strict):
    base: Duration = Field(1.0, description="First retry waits up to this long (full jitter).")
    cap: Duration = Field(300.0, description="Longest wait between two attempts.")
