"""Served models in the SQL store: the models tenants registered (`served_models`) and the
replica bounds operators gave the shared file models (`file_model_scales`).

A registered model's options are one JSON object, validated by
`serve_apps.options.ReplicaOptions` on the way in and on the way out: what a row holds is
always something a replica can be built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from corral.store.tables import FileModelScale, ServedModel, utcnow
from serve_apps.options import ModelKind, ReplicaOptions


@dataclass(frozen=True)
class RidesOn:
    """A LoRA adapter served by a base model's replicas rather than by an app of its own:
    the base (its own name; "file" for a shared models-file model, "registered" for the
    same tenant's) and the id those replicas know the adapter by, new for every
    registration."""

    base_model: str
    base_source: Literal["file", "registered"]
    adapter_id: str


@dataclass(frozen=True)
class RegisteredModel:
    """One tenant's registered model, as stored."""

    tenant: str
    name: str
    kind: ModelKind
    checkpoint_dir: str
    adapter_dir: str | None
    options: ReplicaOptions
    # The uuid (in the tenant's namespace) of the job whose checkpoint this is.
    source_job_uuid: str | None = None
    # A reward model's label weights (`corral.serving.catalog.ModelSpec.score_weights`).
    score_weights: dict[str, float] | None = None
    rides_on: RidesOn | None = None

    def what_was_asked(self) -> dict[str, Any]:
        """Everything a registration chose, flat: two registrations are the same when
        these are equal."""
        return {
            "kind": self.kind,
            "checkpoint_dir": self.checkpoint_dir,
            "adapter_dir": self.adapter_dir,
            **self.options.option_values(),
            "source_job_uuid": self.source_job_uuid,
            "score_weights": self.score_weights,
        }


@dataclass(frozen=True)
class FileScale:
    min_replicas: int
    max_replicas: int


class ServedModelStore:
    """Reads and writes served models inside the caller's transaction; never commits."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def get(self, *, tenant: str, name: str) -> RegisteredModel | None:
        row = self._session.get(ServedModel, (tenant, name))
        return _model(row) if row is not None else None

    def find(self, *, tenant: str | None) -> list[RegisteredModel]:
        """The tenant's registered models by name; every tenant's with `tenant=None`."""
        query = select(ServedModel).order_by(ServedModel.tenant, ServedModel.name)
        if tenant is not None:
            query = query.where(ServedModel.tenant == tenant)
        return [_model(row) for row in self._session.scalars(query)]

    def add(self, model: RegisteredModel) -> None:
        """Store a new registration; a row under the same (tenant, name) makes the flush
        (or the commit) raise IntegrityError."""
        now = utcnow()
        self._session.add(
            ServedModel(
                tenant=model.tenant,
                name=model.name,
                kind=model.kind,
                checkpoint_dir=model.checkpoint_dir,
                adapter_dir=model.adapter_dir,
                options=_stored(model.options),
                source_job_uuid=model.source_job_uuid,
                score_weights=model.score_weights,
                base_model=model.rides_on.base_model if model.rides_on else None,
                base_source=model.rides_on.base_source if model.rides_on else None,
                adapter_id=model.rides_on.adapter_id if model.rides_on else None,
                created_at=now,
                updated_at=now,
            )
        )
        self._session.flush()

    def set_options(self, *, tenant: str, name: str, options: ReplicaOptions) -> bool:
        """Replace a registered model's options; False if there is no such model."""
        row = self._session.get(ServedModel, (tenant, name))
        if row is None:
            return False
        row.options, row.updated_at = _stored(options), utcnow()
        self._session.flush()
        return True

    def delete(self, *, tenant: str, name: str) -> None:
        self._session.execute(
            delete(ServedModel).where(ServedModel.tenant == tenant, ServedModel.name == name)
        )

    def file_scales(self) -> dict[str, FileScale]:
        """The bounds operators stored for file models, by the model's name in the file."""
        return {
            row.name: FileScale(row.min_replicas, row.max_replicas)
            for row in self._session.scalars(select(FileModelScale))
        }

    def set_file_scale(
        self, *, name: str, min_replicas: int, max_replicas: int, scaled_by: str
    ) -> None:
        """Store a file model's bounds. Another process storing the first row for the same
        model at the same time makes the flush raise IntegrityError (the caller retries)."""
        row = self._session.get(FileModelScale, name)
        if row is None:
            row = FileModelScale(name=name)
            self._session.add(row)
        row.min_replicas, row.max_replicas = min_replicas, max_replicas
        row.scaled_by, row.updated_at = scaled_by, utcnow()
        self._session.flush()


def _stored(options: ReplicaOptions) -> dict[str, Any]:
    # Validated again: a ReplicaOptions made with model_copy skips its validators.
    return ReplicaOptions.model_validate(options.option_values()).option_values()


def _model(row: ServedModel) -> RegisteredModel:
    return RegisteredModel(
        tenant=row.tenant,
        name=row.name,
        kind=row.kind,  # type: ignore[arg-type]  # written only from a ModelKind
        checkpoint_dir=row.checkpoint_dir,
        adapter_dir=row.adapter_dir,
        options=ReplicaOptions.model_validate(row.options),
        source_job_uuid=row.source_job_uuid,
        score_weights=row.score_weights,  # written only from a ScoreWeights
        rides_on=(
            RidesOn(
                base_model=row.base_model,
                base_source="file" if row.base_source == "file" else "registered",
                adapter_id=row.adapter_id or "",
            )
            if row.base_model is not None
            else None
        ),
    )
