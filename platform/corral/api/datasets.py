"""Datasets: a table at a URL, with typed columns, registered once and used by jobs."""

from __future__ import annotations

from typing import Literal

from corral.api.common import URL, Id, JsonObject, SpecModel

ColumnType = Literal["dialog", "text", "media", "number", "json"]


class Dataset(SpecModel):
    """Dataset to be used for training or evaluating language models."""

    columns: dict[str, ColumnType]
    content_url: URL
    metadata: JsonObject


class CreateDatasetRequest(SpecModel):
    """Request to create a dataset."""

    uuid: Id
    dataset: Dataset
