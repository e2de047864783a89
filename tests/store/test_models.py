"""The served-models store on both backends: options are one JSON object that
ReplicaOptions validates on the way in and out (the replica bounds the old CHECK
constraint held)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import update

from corral.store.db import Database
from corral.store.models import RegisteredModel, ServedModelStore
from corral.store.tables import ServedModel
from serve_apps.options import ReplicaOptions

pytestmark = pytest.mark.integration

MODEL = RegisteredModel(
    tenant="alpha",
    name="m",
    kind="llm",
    checkpoint_dir="/c",
    adapter_dir=None,
    options=ReplicaOptions(device="cpu", max_queued_requests=3, max_replicas=2),
)


def test_options_round_trip_and_bad_bounds_never_reach_a_row(database: Database) -> None:
    with database.transaction() as session:
        ServedModelStore(session).add(MODEL)
    with database.transaction() as session:
        store = ServedModelStore(session)
        assert store.get(tenant="alpha", name="m") == MODEL
        assert store.get(tenant="beta", name="m") is None
        unchecked = ReplicaOptions.model_construct(min_replicas=3, max_replicas=2)
        with pytest.raises(ValidationError, match="max_replicas must be at least"):
            store.set_options(tenant="alpha", name="m", options=unchecked)
    with database.transaction() as session:
        assert ServedModelStore(session).find(tenant=None) == [MODEL]
        session.execute(update(ServedModel).values(options={"min_replicas": -1}))
    with database.transaction() as session, pytest.raises(ValidationError):
        ServedModelStore(session).get(tenant="alpha", name="m")
