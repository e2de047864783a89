"""A multi-node Ray cluster on one machine, in a process of its own, for tests/cluster.

    python -m tests.cluster.cluster_host CONFIG.json

`ray.cluster_utils.Cluster` starts a head (GCS, dashboard with the Jobs API, raylet) and
one raylet per worker node, each with its own resources and its own dashboard agent,
metrics and runtime-env ports. It runs here rather than in the pytest process: that
process may hold the session's own Ray cluster (tests/conftest.py), and a driver of this
one there would be a second Ray in one process. The parent sets this process's
environment: token authentication with the test's own token file, and `RAY_ADDRESS` at
the head's GCS port (chosen by the parent), which every Ray process of the cluster
inherits, so that anything in it that looks for "the" cluster (Ray Train's placement
group cleaner asks the state API with no address) finds this one, not another Ray on the
machine.

Protocol: one JSON line out once every node is up (`{"nodes": {name: node id}, ...}`),
then one JSON line in per command and one out per answer:
`{"remove": NAME, "graceful": bool}` kills that node's processes (never the head's);
`{"stop": true}` (or the end of stdin) shuts the cluster down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import ray._common.utils
import ray._private.utils
from ray.cluster_utils import Cluster


def _address_file_in_own_temp_dir(temp_dir: str) -> None:
    """Cluster records the head's address in `ray_current_cluster` (for a bare
    `ray.init()`), and Ray Jobs' supervisor reads that file in its node's temp dir to give
    each job's driver its RAY_ADDRESS. Without the file the supervisor takes any GCS
    process it sees on the machine, which is the session's cluster as often as this one
    when both run. The file goes in this cluster's own temp dir, where no other Ray looks,
    and its shutdown deletes only that one."""
    write = ray._private.utils.write_ray_address
    reset = ray._common.utils.reset_ray_address
    ray._private.utils.write_ray_address = lambda address, *_, **__: write(address, temp_dir)
    ray._common.utils.reset_ray_address = lambda *_, **__: reset(temp_dir)


def start(config: dict[str, Any]) -> tuple[Cluster, dict[str, Any]]:
    common = {
        "temp_dir": config["temp_dir"],
        "object_store_memory": 80 * 1024 * 1024,
    }
    head_spec = config["head"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args=common
        | {
            "gcs_server_port": config["gcs_port"],
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": config["dashboard_port"],
            # Ray's fixed default (52365) collides with any other Ray head on the machine.
            "dashboard_agent_listen_port": 0,
            "num_cpus": head_spec.get("num_cpus", 1),
            "num_gpus": head_spec.get("num_gpus", 0),
            "resources": head_spec.get("resources", {}),
            "_system_config": config.get("system_config", {}),
        },
    )
    nodes = {"head": cluster.head_node}
    for name, spec in config["workers"].items():
        # add_node gives each worker node a dashboard agent port of its own.
        nodes[name] = cluster.add_node(
            **common,
            num_cpus=spec.get("num_cpus", 1),
            num_gpus=spec.get("num_gpus", 0),
            resources=spec.get("resources", {}),
        )
    cluster.wait_for_nodes(timeout=60)
    return cluster, nodes


def main(config: dict[str, Any]) -> None:
    _address_file_in_own_temp_dir(config["temp_dir"])
    cluster, nodes = start(config)
    ready = {
        "nodes": {name: node.node_id for name, node in nodes.items()},
        "gcs_address": cluster.address,
        "dashboard_url": f"http://{cluster.webui_url}",
    }
    print(json.dumps(ready), flush=True)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("stop"):
                break
            name = command["remove"]
            if name == "head" or name not in nodes:
                print(json.dumps({"error": f"cannot remove node {name!r}"}), flush=True)
                continue
            cluster.remove_node(nodes.pop(name), allow_graceful=bool(command.get("graceful")))
            print(json.dumps({"removed": name}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
