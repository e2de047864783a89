"""An API server process for the chaos test (tests/api/test_chaos.py), built the way
`corral serve` builds it (a started model registry, the Ray Jobs launcher, the
reconciler) but on the test session's Ray cluster, with two test-only differences: the
model runs on the scripted engine, so a stream lasts as long as the test needs, and the
dataset fetcher may reach the test's own loopback HTTP server, so a request can be held
in flight at a point the test knows.

Run as `python -m tests.api.chaos_server CONFIG.json`. It serves on the listening socket
it inherits (its fd is in the config): the test keeps that socket open, so the server it
starts again after a SIGKILL serves on the same port, with no bind race.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import ray
import uvicorn
from ray import serve

from corral.app import create_app, fetch_policy
from corral.config import Settings
from corral.content import ContentFetcher
from corral.job_tokens import JobTokens
from corral.ray_jobs import RayJobLauncher
from corral.services.models import build_model_service
from corral.serving.catalog import ModelSpec, model_roots
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine

LOOPBACK = ipaddress.ip_network("127.0.0.1/32")


def serve_forever(config: dict[str, Any]) -> None:
    ray.init(address=config["ray_address"], namespace="corral-tests", log_to_driver=False)
    serve.start(proxy_location="Disabled")
    settings = Settings(
        home=Path(config["home"]),
        api_keys=config["api_keys"],
        dataset_roots=config["dataset_root"],
        fetch_allow_http=True,
    )
    database = Database(config["database_url"])
    engine = partial(
        scripted_engine, ScriptedEngineConfig(config["reply"], config["seconds_per_step"])
    )
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(engine_factory=engine),
        file_models=[
            ModelSpec(
                name=config["model_name"],
                aliases=["llama3_8b", "llama3_8b_chat"],
                checkpoint_dir=Path(config["model_dir"]),
                cpus_per_replica=0.25,
            )
        ],
        model_roots=model_roots(settings),
    )
    registry.start()  # an unchanged app is not redeployed: a restart keeps the replica
    policy = replace(fetch_policy(settings), extra_allowed_networks=(LOOPBACK,))
    listening = socket.socket(fileno=config["fd"])
    app = create_app(
        settings,
        database=database,
        fetcher=ContentFetcher(policy),
        models=registry,
        launcher=RayJobLauncher(
            config["ray_jobs_url"],
            internal_url=f"http://127.0.0.1:{listening.getsockname()[1]}",
            tokens=JobTokens.from_settings(settings),
        ),
        cluster_resources=ray.cluster_resources,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[listening])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    serve_forever(json.loads(Path(sys.argv[1]).read_text()))
