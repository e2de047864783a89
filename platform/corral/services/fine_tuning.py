"""From a post-training request to what the job process runs (its "launch" config).

Everything that can be checked before a GPU is spent is checked here, so a bad request is
a 4xx at submission rather than a failed job later: the job uuid's alphabet, the model
(known, and a full checkpoint), `algorithm_config` against `algorithm`, the options Corral
does not offer (a hyperparameter search; a `logger_config` other than `{}` or
`{"tensorboard": true}`), both datasets (reachable, declaring and carrying the columns the
method needs), and finally the recipe's own config validation (jobs/config.py: pydantic
only, so validating a submission loads no torch into the API process).

Columns each method needs (the dataset must declare them with these types):
- supervised_fine_tune: `dialog` (dialog) — the assistant turns are what is learnt.
- preference_optimize (DPO): `prompt` (dialog, ending with the user's turn), `chosen`
  and `rejected` (text: the preferred and the dispreferred assistant reply).

Mapping of `training_config` onto the recipes' distribution settings:
`memory_efficient_fsdp_wrap` -> DeepSpeed ZeRO-3; `fsdp_cpu_offload` -> optimizer (and,
with ZeRO-3, parameter) offload to CPU, on ZeRO-2 unless the wrap asks for 3; neither ->
the server's `CORRAL_TRAIN_ZERO_STAGE` (unset: plain DDP); `enable_activation_checkpointing`
-> activation (gradient) checkpointing.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import ValidationError

from corral.api.datasets import Dataset
from corral.api.post_training import (
    PostTrainingRLHFRequest,
    PostTrainingSFTRequest,
    TrainingConfig,
)
from corral.config import Settings
from corral.errors import ContentUnavailable, InvalidRequest, NotFound
from corral.services.datasets import DatasetService, Row
from corral.serving.resolver import ResolvedModel, check_kind
from corral.storage import Storage
from corral.tenancy import job_key
from jobs.config import DPOJobConfig, SFTJobConfig, TrainingJobConfig
from jobs.logger_config import LoggerConfig
from jobs.rows import PREFERENCE_COLUMNS, SFT_COLUMNS
from serve_apps.model_cache import local_path


class ModelLocator(Protocol):
    """Where a model's weights are (the models service)."""

    def resolve(self, *, tenant: str, model: str, fresh: bool = False) -> ResolvedModel: ...

    def checked_location(
        self, value: str, field: str, required_file: str, *, tenant: str
    ) -> Path | str: ...


@dataclass(frozen=True)
class TrainingDefaults:
    """Server-side settings every job gets; none of them come from a request."""

    checkpoints_dir: Path
    num_workers: int = 2
    use_gpu: bool = False
    zero_stage: int | None = None
    dtype: str = "float32"
    max_seq_len: int = 2048

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingDefaults:
        return cls(
            checkpoints_dir=settings.checkpoints_dir,
            num_workers=settings.train_workers,
            use_gpu=settings.train_use_gpu,
            zero_stage=settings.train_zero_stage,
            dtype=settings.train_dtype,
            max_seq_len=settings.train_max_seq_len,
        )


class LaunchPlanner:
    """Builds and checks launch configs (which never say where the job reports: the job
    process is told that by its environment, docs/job_credentials.md). A job's workers
    are the configured number, never fewer to fit the cluster: admission refuses a job
    the cluster can never run and queues one it cannot run yet (services/admission.py)."""

    def __init__(
        self,
        *,
        datasets: DatasetService,
        models: ModelLocator,
        defaults: TrainingDefaults,
        storage: Storage | None = None,
    ) -> None:
        """`storage`: where jobs write (corral.storage); by default the checkpoints
        directory of `defaults`."""
        self._datasets = datasets
        self._models = models
        self._defaults = defaults
        self._storage = storage or Storage(str(defaults.checkpoints_dir))

    def plan_sft(self, *, tenant: str, request: PostTrainingSFTRequest) -> dict[str, Any]:
        _reject_unsupported(request.hyperparam_search_config, request.logger_config)
        try:
            model = self._models.resolve(tenant=tenant, model=request.model, fresh=True)
        except NotFound:
            raise InvalidRequest(f"model {request.model!r} is not known to this server") from None
        check_kind(model, "llm")  # a reward model's head is not what SFT trains
        if model.spec.adapter_dir is not None:
            raise InvalidRequest(
                f"model {request.model!r} is a LoRA adapter; fine-tune its base model instead"
            )
        rows = self._rows(tenant, request.dataset, SFT_COLUMNS, "dataset")
        validation_rows = self._rows(
            tenant, request.validation_dataset, SFT_COLUMNS, "validation_dataset"
        )
        settings: dict[str, Any] = {
            "model_dir": str(model.spec.checkpoint_dir),
            "algorithm": request.algorithm,
            # `full` has no adapter; the spec still sends a LoRA-shaped config with it.
            "adapter": (
                request.algorithm_config.model_dump(mode="json")
                if request.algorithm != "full"
                else None
            ),
        }
        return self._checked(
            SFTJobConfig,
            tenant=tenant,
            job_uuid=request.job_uuid,
            rows=rows,
            validation_rows=validation_rows,
            training=request.training_config,
            optimizer=request.optimizer_config.model_dump(mode="json"),
            **settings,
        )

    def plan_dpo(self, *, tenant: str, request: PostTrainingRLHFRequest) -> dict[str, Any]:
        _reject_unsupported(request.hyperparam_search_config, request.logger_config)
        model_dir = self._model_dir_from_url(tenant, str(request.finetuned_model))
        rows = self._rows(tenant, request.dataset, PREFERENCE_COLUMNS, "dataset")
        validation_rows = self._rows(
            tenant, request.validation_dataset, PREFERENCE_COLUMNS, "validation_dataset"
        )
        return self._checked(
            DPOJobConfig,
            tenant=tenant,
            job_uuid=request.job_uuid,
            rows=rows,
            validation_rows=validation_rows,
            training=request.training_config,
            optimizer=request.optimizer_config.model_dump(mode="json"),
            model_dir=str(model_dir),
            dpo=request.algorithm_config.model_dump(mode="json"),
        )

    # ------------------------------------------------------------------ parts

    def _checked(
        self,
        config_class: type[TrainingJobConfig],
        *,
        tenant: str,
        job_uuid: str,
        rows: list[Row],
        validation_rows: list[Row],
        training: TrainingConfig,
        **specific: Any,
    ) -> dict[str, Any]:
        """The launch config, validated by the recipe's config class (jobs/config.py,
        which the job process validates the stored config with again). The job writes
        under its tenant's own checkpoints directory, in a folder named by its uuid."""
        launch: dict[str, Any] = {
            "job_key": job_key(tenant, job_uuid),
            **self._output(tenant, job_uuid),
            "rows": rows,
            "validation_rows": validation_rows,
            "n_epochs": training.n_epochs,
            "n_iters": training.n_iters,
            "batch_size": training.batch_size,
            "shuffle": training.shuffle,
            "max_seq_len": self._defaults.max_seq_len,
            "num_workers": self._defaults.num_workers,
            "use_gpu": self._defaults.use_gpu,
            "dtype": self._defaults.dtype,
            **_distribution(training, self._defaults.zero_stage),
            **specific,
        }
        try:
            config = config_class.model_validate(launch)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidRequest(f"the job cannot run as asked: {problems}") from None
        checked: dict[str, Any] = config.model_dump(mode="json")
        return checked

    def _rows(self, tenant: str, dataset: Dataset, needed: dict[str, str], field: str) -> list[Row]:
        declared = {name: str(kind) for name, kind in dataset.columns.items()}
        for name, kind in needed.items():
            if declared.get(name) != kind:
                wanted = ", ".join(f"{n} ({k})" for n, k in needed.items())
                raise InvalidRequest(
                    f"{field} must declare the column {name!r} of type {kind!r} "
                    f"(this method needs: {wanted})"
                )
        try:
            rows = self._datasets.load_rows(dataset, tenant=tenant)
        except (InvalidRequest, ContentUnavailable) as exc:
            raise type(exc)(f"{field}: {exc.message}") from None
        # CSV cells carry dialogs as JSON text; the recipe wants the messages themselves.
        return [
            {
                name: json.loads(row[name])
                if kind == "dialog" and isinstance(row[name], str)
                else row[name]
                for name, kind in needed.items()
            }
            for row in rows
        ]

    def _output(self, tenant: str, job_uuid: str) -> dict[str, Any]:
        return job_output(self._storage, tenant, job_uuid)

    def _model_dir_from_url(self, tenant: str, url: str) -> Path | str:
        """DPO's start: a checkpoint directory as `/post_training/job/artifacts` gives it,
        a `file://` URL or (object storage) an `https://` one."""
        parts = urlsplit(url)
        if parts.scheme not in ("file", "https", "http"):
            raise InvalidRequest(
                "finetuned_model must be the URL of a checkpoint directory, as "
                "/post_training/job/artifacts gives it (file:// or https://)"
            )
        return self._models.checked_location(url, "finetuned_model", "config.json", tenant=tenant)


def job_output(storage: Storage, tenant: str, job_uuid: str) -> dict[str, Any]:
    """Where a job writes: its directory in storage (`ROOT/TENANT-SLUG/UUID`). On a
    directory every node sees, that is its `output_dir`; in object storage it is its
    `output_uri`, and `output_dir` is scratch space on each node (jobs/checkpointer.py).
    Every job kind's launch config carries these three fields."""
    uri = storage.job_uri(tenant, job_uuid)
    if storage.is_local:
        return {"output_dir": str(local_path(uri))}
    key = job_key(tenant, job_uuid)
    return {
        "output_dir": str(Path(tempfile.gettempdir()) / "corral-jobs" / key),
        "output_uri": uri,
        "storage": storage.options.model_dump(mode="json"),
    }


def _distribution(training: TrainingConfig, default_stage: int | None) -> dict[str, Any]:
    stage = default_stage
    if training.fsdp_cpu_offload:
        stage = 2
    if training.memory_efficient_fsdp_wrap:
        stage = 3
    return {
        "zero_stage": stage,
        "cpu_offload": training.fsdp_cpu_offload,
        "activation_checkpointing": training.enable_activation_checkpointing,
    }


def _reject_unsupported(hyperparam_search: dict[str, Any], logger: dict[str, Any]) -> None:
    """Corral runs one configuration per job, and its metrics always go to the SQL store
    (`logger_config` may add TensorBoard files: jobs/logger_config.py); a sweep or another
    logger would be silently ignored otherwise."""
    if hyperparam_search:
        raise InvalidRequest(
            "hyperparam_search_config is not supported: submit one job per configuration "
            "and send {}"
        )
    try:
        LoggerConfig.model_validate(logger)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequest(
            f"logger_config is not supported as sent ({problems}): send {{}} (metrics are "
            'in /post_training/job/metrics) or {"tensorboard": true} (TensorBoard event '
            "files beside the checkpoints as well)"
        ) from None
