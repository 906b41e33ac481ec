"""Per-token inference limits: requests at once, and requests per minute (a token bucket)."""

from __future__ import annotations

import gc

import pytest

from hostgpu.gateway import quotas as quotas_module
from hostgpu.gateway.quotas import Slot, TokenQuotas
from hostgpu.inference.errors import RateLimited


def test_concurrency_limit_is_per_token_and_freed_on_release() -> None:
    quotas = TokenQuotas(per_minute=1000, concurrent=2)
    first, second = Slot(), Slot()
    quotas.admit("a", first)
    quotas.admit("a", second)
    with pytest.raises(RateLimited, match="HOSTGPU_INFER_CONCURRENCY") as refused:
        quotas.admit("a", Slot())
    assert refused.value.status_code == 429 and refused.value.retry_after == 1
    quotas.admit("b", Slot())  # another token has its own allowance
    quotas.release("a", first)
    third = Slot()
    quotas.admit("a", third)
    # A request whose response never ran is never released: its slot frees when it is gone.
    del second, third
    gc.collect()
    quotas.admit("a", Slot())


def test_rate_limit_refills_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(quotas_module.time, "monotonic", lambda: now[0])
    quotas = TokenQuotas(per_minute=60, concurrent=1000)
    for _ in range(60):
        slot = Slot()
        quotas.admit("a", slot)
        quotas.release("a", slot)
    with pytest.raises(RateLimited, match="60 requests per minute"):
        quotas.admit("a", Slot())
    now[0] += 1.0  # one request's worth comes back each second
    quotas.admit("a", Slot())
    with pytest.raises(RateLimited):
        quotas.admit("a", Slot())
