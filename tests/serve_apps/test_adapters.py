"""The adapter slots of one replica: bounded, least recently used first, and fair between
tenants, under any sequence of requests and releases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_apps.adapters import AdapterSlots, Admission

TENANTS = ("a", "b", "c")
# ("admit", tenant, adapter number) or ("release", index into the requests in flight).
Step = tuple[str, str, int] | tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(TENANTS), st.integers(0, 5)),
        st.tuples(st.just("release"), st.integers(0, 50)),
    ),
    max_size=80,
)
shapes = st.integers(1, 6).flatmap(lambda c: st.tuples(st.just(c), st.integers(1, c)))


def adapter(tenant: str, number: int) -> str:
    return f"{tenant}-{number}"


@settings(max_examples=150, deadline=None)
@given(shape=shapes, plan=steps)
def test_slots_stay_bounded_fair_and_never_evict_a_busy_adapter(
    shape: tuple[int, int], plan: list[Step]
) -> None:
    capacity, per_tenant = shape
    slots = AdapterSlots(capacity=capacity, per_tenant=per_tenant)
    in_flight: list[str] = []
    loaded: dict[int, str] = {}  # what the engine holds, as the admissions told it
    for step in plan:
        if step[0] == "release":
            if in_flight:
                slots.release(in_flight.pop(step[1] % len(in_flight)))
            continue
        _, tenant, number = step
        name = adapter(tenant, number)
        before = slots.resident()
        held_before = {t: sum(1 for x in before.values() if x == t) for t in TENANTS}
        busy = slots.busy()
        admission = slots.admit(name, tenant)
        after = slots.resident()
        if admission is None:
            assert after == before  # a request that waits changes nothing
            idle = [a for a in before if a not in busy]
            own_idle = [a for a in idle if before[a] == tenant]
            if held_before[tenant] >= per_tenant:
                assert not own_idle  # it waits only when it could evict nothing
            else:
                assert len(before) == capacity and not idle
            continue
        in_flight.append(name)
        for slot in admission.evict:
            victim = loaded.pop(slot)
            assert victim not in busy  # a busy adapter is never unloaded
            if before[victim] != tenant:
                # Another tenant's adapter goes only while this tenant is under its
                # share, and only from a tenant holding the most idle slots.
                assert held_before[tenant] < per_tenant
                idle_holders = {before[a] for a in before if a not in busy}
                assert held_before[before[victim]] == max(held_before[t] for t in idle_holders)
        if admission.load:
            assert name not in before and admission.slot not in loaded
            loaded[admission.slot] = name
        else:
            assert name in before and loaded[admission.slot] == name
        assert set(loaded.values()) == set(after)
        assert len(after) <= capacity
        assert all(sum(1 for x in after.values() if x == t) <= per_tenant for t in TENANTS)


@settings(max_examples=100, deadline=None)
@given(shape=shapes, others=st.lists(st.tuples(st.sampled_from(("b", "c")), st.integers(0, 5))))
def test_one_tenants_churn_leaves_the_others_their_share(
    shape: tuple[int, int], others: list[tuple[str, int]]
) -> None:
    """However many adapters one tenant cycles through, the other tenants keep what they
    had, or at least the slots its share leaves them."""
    capacity, per_tenant = shape
    slots = AdapterSlots(capacity=capacity, per_tenant=per_tenant)
    for tenant, number in others:
        if slots.admit(adapter(tenant, number), tenant) is not None:
            slots.release(adapter(tenant, number))
    before = sum(1 for t in slots.resident().values() if t != "a")
    for number in range(3 * capacity):
        assert slots.admit(adapter("a", number), "a") is not None
        slots.release(adapter("a", number))
        kept = sum(1 for t in slots.resident().values() if t != "a")
        assert kept >= min(before, capacity - per_tenant)
    assert 1 <= slots.held_by("a") <= per_tenant


def test_least_recently_used_goes_first() -> None:
    slots = AdapterSlots(capacity=3, per_tenant=3)
    first: dict[str, Admission] = {}
    for name in ("x", "y", "z"):
        admitted = slots.admit(name, "a")
        assert admitted is not None and admitted.load and not admitted.evict
        first[name] = admitted
        slots.release(name)
    assert slots.admit("x", "a") == Admission(slot=first["x"].slot, load=False)
    slots.release("x")  # x is now the most recent; y the least
    admission = slots.admit("w", "a")
    assert admission is not None and admission.evict == (first["y"].slot,)


def test_a_tenant_at_its_share_evicts_its_own() -> None:
    slots = AdapterSlots(capacity=4, per_tenant=2)
    for name, tenant in (("b1", "b"), ("b2", "b"), ("a1", "a"), ("a2", "a")):
        assert slots.admit(name, tenant) is not None
        slots.release(name)
    admission = slots.admit("a3", "a")
    assert admission is not None and admission.load
    assert set(slots.resident()) == {"b1", "b2", "a2", "a3"}  # a1 was a's oldest


def test_a_request_waits_while_every_candidate_is_busy() -> None:
    slots = AdapterSlots(capacity=2, per_tenant=1)
    assert slots.admit("a1", "a") is not None
    assert slots.admit("b1", "b") is not None
    assert slots.admit("a2", "a") is None  # a is at its share and a1 is busy
    slots.release("a1")
    admission = slots.admit("a2", "a")
    assert admission is not None and admission.load and len(admission.evict) == 1


@pytest.mark.parametrize(("capacity", "per_tenant"), [(0, 1), (2, 0), (2, 3)])
def test_bounds_are_checked(capacity: int, per_tenant: int) -> None:
    with pytest.raises(ValueError, match=r"capacity|per_tenant"):
        AdapterSlots(capacity=capacity, per_tenant=per_tenant)
