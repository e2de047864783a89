"""Ray drivers of the multi-node tests, each run in a process of its own on the test's
cluster (tests/cluster/cluster_host.py says why not in the pytest process):

    python -m tests.cluster.drivers NAME ARGS_JSON

The process's environment points Ray at the cluster (RAY_ADDRESS and its token); the
driver prints one JSON line, its result, last.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

Driver = Callable[[dict[str, Any]], dict[str, Any]]


def submit_job(args: dict[str, Any]) -> dict[str, Any]:
    """Submit a stored job through Corral's launcher (the Ray Jobs API, `python -m
    jobs.launch`), as the API server does: the job reports to the internal routes at
    `internal_url` with the token made under `token_secret` (docs/job_credentials.md)."""
    from corral.job_tokens import JobTokens
    from corral.ray_jobs import RayJobLauncher

    launcher = RayJobLauncher(
        args["jobs_url"],
        internal_url=args["internal_url"],
        tokens=JobTokens(args["token_secret"].encode()),
    )
    return {"submitted": launcher.submit(args["job_key"])}


def tensor_parallel_placement(args: dict[str, Any]) -> dict[str, Any]:
    """For each of `gpus_per_replica`: the placement group Serve would make for a
    tensor-parallel `engine: vllm` replica with that many GPUs (the bundles and strategy
    of `serve_apps.deployment`), made here directly and waited for `wait_s[gpus]`: where
    its bundles land, and where a GPU worker scheduled into its second bundle runs; or,
    when it is not placed, whether the same bundles packed loosely (PACK) would be, and
    where. vLLM itself is not started."""
    from ray.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from serve_apps.deployment import deployment_options
    from serve_apps.llm import DEPLOYMENT_NAME, LLMAppConfig

    ray.init(log_to_driver=False)
    result: dict[str, Any] = {}
    for gpus in args["gpus_per_replica"]:
        config = LLMAppConfig(
            name=f"tp{gpus}",
            model_dir="/unused",
            engine="vllm",
            gpus_per_replica=gpus,
            cpus_per_replica=args["cpus_per_replica"],
        )
        options = deployment_options(config, name=DEPLOYMENT_NAME)
        bundles = options["placement_group_bundles"]
        strategy = options["placement_group_strategy"]
        entry: dict[str, Any] = {
            "bundles": bundles,
            "strategy": strategy,
            "replica_num_gpus": options["ray_actor_options"]["num_gpus"],
        }
        group = placement_group(bundles, strategy=strategy)
        try:
            entry["placed"] = group.wait(timeout_seconds=args["wait_s"][str(gpus)])
            table = placement_group_table(group)
            entry["state"] = table["state"]
            entry["bundle_nodes"] = list(table["bundles_to_node_id"].values())
            if entry["placed"]:
                # A vLLM worker's shape: its GPU from the second bundle, and no CPU, as
                # that bundle holds none.
                worker = ray.remote(num_cpus=0, num_gpus=1)(_where_am_i).options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group, placement_group_bundle_index=1
                    )
                )
                entry["worker"] = ray.get(worker.remote(), timeout=120)
            else:
                # The same bundles packed loosely are placed, split over nodes.
                loose = placement_group(bundles, strategy="PACK")
                try:
                    entry["pack_placed"] = loose.wait(timeout_seconds=60)
                    entry["pack_bundle_nodes"] = list(
                        placement_group_table(loose)["bundles_to_node_id"].values()
                    )
                finally:
                    remove_placement_group(loose)
        finally:
            remove_placement_group(group)
        result[str(gpus)] = entry
    return result


def _where_am_i() -> dict[str, Any]:
    return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids()}


def llm_replicas(args: dict[str, Any]) -> dict[str, Any]:
    """Deploy the demo model's LLM app (serve_apps/llm.py, through Corral's deployer)
    with two replicas, generate once, and say where each replica runs; the app is
    deleted again."""
    from ray import serve
    from ray.util.state import list_actors

    from corral.serving.catalog import ModelSpec, file_app_name
    from corral.serving.deployer import ServeDeployer
    from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
    from serve_apps.llm import DEPLOYMENT_NAME

    ray.init(log_to_driver=False, namespace="corral-tests")
    serve.start(proxy_location="Disabled")
    spec = ModelSpec(
        name="multinode-demo",
        checkpoint_dir=Path(args["model_dir"]),
        device="cpu",
        cpus_per_replica=args["cpus_per_replica"],
        min_replicas=args["replicas"],
        max_replicas=args["replicas"],
    )
    app_name = file_app_name(spec.name)
    started = time.monotonic()
    ServeDeployer(deploy_timeout_s=args["deploy_timeout_s"]).deploy(spec, app_name=app_name)
    try:
        deployed_s = time.monotonic() - started
        handle = serve.get_app_handle(app_name)
        request = GenerationRequest(prompt=args["prompt"], sampling=SamplingOptions(max_tokens=4))
        results = [handle.generate.remote(request) for _ in range(args["replicas"] * 2)]
        texts = [r.result(timeout_s=120).text for r in results]
        replicas = list_actors(
            filters=[
                ("class_name", "=", f"ServeReplica:{app_name}:{DEPLOYMENT_NAME}"),
                ("state", "=", "ALIVE"),
            ]
        )
        return {
            "deployed_s": deployed_s,
            "texts": texts,
            "replica_nodes": [actor.node_id for actor in replicas],
        }
    finally:
        serve.delete(app_name)


DRIVERS: dict[str, Driver] = {
    "submit_job": submit_job,
    "tensor_parallel_placement": tensor_parallel_placement,
    "llm_replicas": llm_replicas,
}


if __name__ == "__main__":
    name, raw = sys.argv[1], sys.argv[2]
    print(json.dumps(DRIVERS[name](json.loads(raw))), flush=True)
