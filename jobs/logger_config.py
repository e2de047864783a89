"""What a post-training request's `logger_config` means (pydantic only: the API checks it
at submission, the job's reporter acts on it, and neither needs more than this).

Every job records its per-step metrics in the SQL store whatever it says; the config only
adds writers on top:
- `{}`: nothing more (the default).
- `{"tensorboard": true}`: TensorBoard event files too, written by TensorBoard's own
  writer on rank 0 under `<the job's output directory>/tensorboard`, beside the
  checkpoints; `GET /post_training/job` shows where (`tensorboard_url`).
Any other key is refused at submission (422).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from corral.store.tables import Job

TENSORBOARD_DIR = "tensorboard"


class LoggerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    tensorboard: bool = False


def tensorboard_dir(job: Job) -> Path | None:
    """Where the job writes TensorBoard event files, if its request asked for them. Both
    halves come from the row: the request as submitted and the output directory the job
    was launched with (a job of a kind without a `logger_config` writes none)."""
    logger = (job.request or {}).get("logger_config") or {}
    output_dir = (job.launch or {}).get("output_dir")
    if not isinstance(logger, dict) or not isinstance(output_dir, str):
        return None
    try:
        wanted = LoggerConfig.model_validate(logger).tensorboard
    except ValidationError:  # checked at submission; a row from elsewhere asks for nothing
        return None
    if not wanted:
        return None
    return Path(output_dir) / TENSORBOARD_DIR
