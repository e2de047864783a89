"""`corral sdg run | generate`: synthetic data generation on a running server (`--url`,
bearer key from CORRAL_API_KEY).

A request file (JSON, or YAML: `.yaml`/`.yml`) holds the spec's request fields
(`prompts`, `filtering_function`, `reward_scoring`); for `run`, also `job_uuid` (or give
`--job-uuid`) and `output` (the dataset it writes: `format` sft or dpo, `dataset_id`,
`min_margin`). `run` submits it as a job (`/synthetic_data_generation/jobs`; the same file
again is the same job) and with `--follow` shows its progress until it ends; `generate`
asks the spec's synchronous `/synthetic_data_generation/generate` (small requests) and
prints its answer as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli import remote
from corral.cli.output import JsonOption, fail, print_json

app = typer.Typer(help="synthetic data generation on a running server", no_args_is_help=True)

RequestArgument = Annotated[
    Path, typer.Argument(metavar="FILE", help="the request: JSON, or YAML (.yaml, .yml)")
]


@app.command()
def run(
    request: RequestArgument,
    job_uuid: Annotated[
        str | None, typer.Option(help="the job's uuid (instead of the file's job_uuid)")
    ] = None,
    follow: Annotated[bool, typer.Option(help="show progress until it ends")] = False,
    url: remote.UrlOption = remote.DEFAULT_URL,
    poll: remote.PollOption = 1.0,
    json_output: JsonOption = False,
) -> None:
    """Run a generation request as a job that writes and registers a dataset."""
    body = read_request(request)
    if job_uuid is not None:
        body["job_uuid"] = job_uuid
    if not isinstance(body.get("job_uuid"), str):
        fail(f"{request} has no job_uuid: add one, or give --job-uuid")
    output = body.get("output")
    dataset_id = (output.get("dataset_id") if isinstance(output, dict) else None) or body[
        "job_uuid"
    ]
    with remote.connect(url) as client:
        job = client.submit_generation_job(body)
        if not json_output:
            print(f"submitted {job.job_uuid} (dataset {dataset_id})")
        if follow:
            from corral.job_progress import follow as follow_job

            out = sys.stderr if json_output else sys.stdout
            job = follow_job(client, job.job_uuid, out=out, poll_s=poll)
    if json_output:
        print_json({"job": job, "dataset_id": dataset_id})
    if follow and job.status != "completed":
        fail(f"{job.job_uuid} ended {job.status}")
    if follow and not json_output:
        print(f"dataset {dataset_id} is registered (GET /datasets/get?dataset_id={dataset_id})")


@app.command()
def generate(
    request: RequestArgument,
    url: remote.UrlOption = remote.DEFAULT_URL,
) -> None:
    """Generate, score and filter at once (small requests); prints the answer as JSON."""
    body = read_request(request)
    with remote.connect(url) as client:
        print_json(client.generate_synthetic_data(body))


def read_request(path: Path) -> dict[str, Any]:
    """The request file's object: YAML for `.yaml`/`.yml`, JSON otherwise."""
    import yaml

    try:
        text = path.read_text()
        yaml_file = path.suffix.lower() in (".yaml", ".yml")
        body = yaml.safe_load(text) if yaml_file else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        fail(f"cannot read the request {path}: {exc}")
    if not isinstance(body, dict):
        fail(f"{path} must hold an object (the request's fields)")
    return body
