"""Which LoRA adapters one replica keeps loaded, when many tenants' adapters ride on one
base model (vLLM): at most `capacity` of them, and at most `per_tenant` of one tenant's.

A request for an adapter that is not loaded takes a free slot, or the slot of an idle
adapter (none of its requests in flight): its tenant's own least recently used one when
the tenant is at its share, else the least recently used of the tenant holding the most
slots. So one tenant's churn pushes out other tenants' adapters only while it holds less
than its share, and then those of whoever holds most: it can never push out every other
tenant's adapters, and a tenant holding k adapters loses one to another tenant only when
no idle adapter belongs to a tenant holding more than k. When every candidate is busy
the request waits for a release (`admit` says None).

Pure bookkeeping, no engine: the vLLM engine asks before each request and loads or
unloads what it is told (serve_apps.engines.vllm_engine)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


class AdapterSlotsBusy(RuntimeError):
    """Every adapter slot a request could take stayed busy too long: the replica is
    overloaded (the server's condition, answered 503, not the request's fault). Defined
    here, not beside the vLLM engine, so that the API process can unpickle it."""


@dataclass(frozen=True)
class Admission:
    """What the engine does before running a request on an adapter: unload the adapters
    in `evict` (their engine slots), then, if `load`, load this one as `slot`."""

    slot: int  # the engine's id for this load of the adapter (vLLM's lora_int_id), > 0
    load: bool
    evict: tuple[int, ...] = ()


@dataclass
class _Resident:
    tenant: str
    slot: int
    last_used: int
    in_flight: int = 0


class AdapterSlots:
    """The adapters one replica holds (by adapter id), with their tenants and use."""

    def __init__(self, *, capacity: int, per_tenant: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not 1 <= per_tenant <= capacity:
            raise ValueError("per_tenant must lie between 1 and capacity")
        self.capacity = capacity
        self.per_tenant = per_tenant
        self._resident: dict[str, _Resident] = {}
        self._clock = itertools.count(1)
        self._slots = itertools.count(1)  # never reused: a reload is a new engine adapter

    def admit(self, adapter_id: str, tenant: str) -> Admission | None:
        """Count a request in flight on `adapter_id` (of `tenant`), and say what to load
        and unload for it; None when it must wait (every candidate slot is busy)."""
        entry = self._resident.get(adapter_id)
        if entry is not None:
            entry.in_flight += 1
            entry.last_used = next(self._clock)
            return Admission(slot=entry.slot, load=False)
        victim = self._victim(tenant)
        if victim is None and len(self._resident) >= self.capacity:
            return None
        if victim is None and self.held_by(tenant) >= self.per_tenant:
            return None
        evict: tuple[int, ...] = ()
        if victim is not None:
            evict = (self._resident.pop(victim).slot,)
        slot = next(self._slots)
        self._resident[adapter_id] = _Resident(
            tenant=tenant, slot=slot, last_used=next(self._clock), in_flight=1
        )
        return Admission(slot=slot, load=True, evict=evict)

    def release(self, adapter_id: str) -> None:
        """A request admitted on `adapter_id` ended."""
        entry = self._resident.get(adapter_id)
        if entry is not None and entry.in_flight > 0:
            entry.in_flight -= 1

    def discard(self, adapter_id: str) -> None:
        """Forget `adapter_id` (its load failed): its slot is free again."""
        self._resident.pop(adapter_id, None)

    def held_by(self, tenant: str) -> int:
        return sum(1 for entry in self._resident.values() if entry.tenant == tenant)

    def resident(self) -> dict[str, str]:
        """Adapter id -> tenant, for every adapter held now."""
        return {adapter_id: entry.tenant for adapter_id, entry in self._resident.items()}

    def busy(self) -> set[str]:
        """The adapters with requests in flight (never evicted)."""
        return {adapter_id for adapter_id, e in self._resident.items() if e.in_flight}

    def _victim(self, tenant: str) -> str | None:
        """The adapter a new one of `tenant` replaces; None when there is room (or none
        may be replaced)."""
        idle = {a: e for a, e in self._resident.items() if e.in_flight == 0}
        if self.held_by(tenant) >= self.per_tenant:
            own = [a for a, e in idle.items() if e.tenant == tenant]
            return min(own, key=lambda a: idle[a].last_used) if own else None
        if len(self._resident) < self.capacity or not idle:
            return None
        held = {e.tenant: self.held_by(e.tenant) for e in idle.values()}
        return min(idle, key=lambda a: (-held[idle[a].tenant], idle[a].last_used))
