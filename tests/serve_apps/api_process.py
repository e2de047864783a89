"""An API server process for tests that must kill one: the real app and model registry,
connected to an existing Ray cluster, serving a file model that the test deployed.

    python tests/serve_apps/api_process.py RAY_ADDRESS HOME SPEC_JSON

It binds port 0 itself and prints `PORT <n>` once it listens, so no port is picked by
one process and taken up by another (no bind-release race). It deploys nothing: the
registry's handles reach the test's app by name."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import ray
import uvicorn

from corral.app import create_app
from corral.config import Settings
from corral.services.models import build_model_service
from corral.serving.catalog import ModelRoots, ModelSpec
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database


def main(ray_address: str, home: str, spec_json: str) -> None:
    ray.init(address=ray_address, namespace="corral-tests", log_to_driver=False)
    settings = Settings(home=Path(home), api_keys="alpha:key-alpha")
    settings.home.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    database = Database(settings.resolved_database_url)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=[ModelSpec.model_validate(json.loads(spec_json))],
        model_roots=ModelRoots(shared=()),
    )
    app = create_app(settings, database=database, models=registry)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    # Announced before uvicorn listens: connections wait in the backlog until it does.
    sock.listen(128)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main(*sys.argv[1:4])
