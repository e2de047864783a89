"""The LLM Serve app on a real local Ray Serve: batching, streaming, in-place scaling and
backpressure, driven by the scripted engine (same protocol, no model cost)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_apps.engines.protocol import (
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    StopReason,
    TokenDelta,
)
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine
from serve_apps.llm import DEPLOYMENT_NAME, LLMAppConfig, build_app, deployment_options
from tests.serve_apps.probe_engine import Records, probe_engine, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPLY = "one two three four"


def _config(name: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "model_dir": "/unused/for/scripted",
        "cpus_per_replica": 0.25,
        "min_replicas": 1,
        "max_replicas": 1,
    }
    return base | overrides


def _deploy(config: dict[str, Any], seconds_per_step: float = 0.0) -> DeploymentHandle:
    engine = partial(scripted_engine, ScriptedEngineConfig(REPLY, seconds_per_step))
    app_name = LLMAppConfig.model_validate(config).app_name
    return serve.run(build_app(config, engine_factory=engine), name=app_name, route_prefix=None)


def _running_replicas(app_name: str) -> int:
    deployment = serve.status().applications[app_name].deployments[DEPLOYMENT_NAME]
    return int(deployment.replica_states.get("RUNNING", 0))


@pytest.fixture
def app(serve_instance: None, request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.node.name.replace("[", "-").replace("]", "")[:40]
    yield name
    serve.delete(f"llm-{name}")


def _request(max_tokens: int = 0, logprobs: bool = False) -> GenerationRequest:
    return GenerationRequest(
        prompt="<|begin_of_text|>hi",
        sampling=SamplingOptions(max_tokens=max_tokens, logprobs=logprobs),
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        LLMAppConfig.model_validate(_config("x", min_replicas=3, max_replicas=2))
    with pytest.raises(ValueError):
        LLMAppConfig.model_validate(_config("x", entrypoint="rm -rf /"))
    options = deployment_options(LLMAppConfig.model_validate(_config("x", max_batch_size=16)))
    assert options["max_ongoing_requests"] >= 16
    assert options["autoscaling_config"]["min_replicas"] == 1


def test_unary_generation(app: str) -> None:
    handle = _deploy(_config(app))
    result: GenerationResult = handle.generate.remote(_request()).result()
    assert result.text == REPLY
    assert result.stop_reason is StopReason.END_OF_TURN
    short: GenerationResult = handle.generate.remote(_request(max_tokens=2)).result()
    assert (short.text, short.stop_reason) == ("one two", StopReason.OUT_OF_TOKENS)


def test_requests_that_arrive_while_the_engine_decodes_join_its_batch(
    app: str, tmp_path: Path
) -> None:
    """One request is held inside the engine; three streams and three unary requests
    arrive meanwhile and wait on the replica. Released, they join the running batch
    together, streams and unary requests alike, and each gets its own whole answer."""
    records = Records(tmp_path / "records")
    handle = _deploy_probe(_config(app, max_batch_size=8), records)
    held = handle.generate.remote(_held("first"))
    wait_for(lambda: records.started("first"), "the replica to start the held request")
    streams = [
        handle.options(stream=True).stream.remote(_named(f"stream-{index}")) for index in range(3)
    ]
    unary = [handle.generate.remote(_named(f"unary-{index}")) for index in range(3)]
    wait_for(lambda: handle.stats.remote().result()["waiting"] == 6, "six waiting requests")
    records.release()
    assert held.result(timeout_s=30).text == REPLY
    assert all(response.result(timeout_s=30).text == REPLY for response in unary)
    for stream in streams:
        items = list(stream)
        deltas = [item for item in items if isinstance(item, TokenDelta)]
        assert "".join(delta.text for delta in deltas) == items[-1].text == REPLY
    stats = handle.stats.remote().result()
    assert stats["batch_sizes"] == [1, 6]  # the held request, then the six that joined it
    assert stats["largest_step"] == 7


def test_streaming_yields_tokens_then_the_result(app: str) -> None:
    handle = _deploy(_config(app))
    items = list(handle.options(stream=True).stream.remote(_request(logprobs=True)))
    deltas = [i for i in items if isinstance(i, TokenDelta)]
    assert isinstance(items[-1], GenerationResult)
    assert sum(isinstance(i, GenerationResult) for i in items) == 1
    assert "".join(d.text for d in deltas) == items[-1].text == REPLY
    assert all(d.logprob == 0.0 for d in deltas)


def _deploy_probe(config: dict[str, Any], records: Records) -> DeploymentHandle:
    """Deploy with a pinned code version, as Corral's deployer does: a change of replica
    bounds then scales in place (serve.run alone would restart the replica, which waits
    out a held request before it goes)."""
    engine = partial(probe_engine, records.config(reply=REPLY))
    app_name = LLMAppConfig.model_validate(config).app_name
    built = build_app(config, engine_factory=engine)
    pinned = Application(built._bound_deployment.options(version="probe", _internal=True))
    return serve.run(pinned, name=app_name, route_prefix=None)


def _named(name: str) -> GenerationRequest:
    return GenerationRequest(prompt=f"id={name}", sampling=SamplingOptions())


def _held(name: str) -> GenerationRequest:
    """A request the probe engine holds on the replica until the test releases it."""
    return GenerationRequest(prompt=f"id={name} hold", sampling=SamplingOptions())


def test_scaling_in_place_keeps_requests_in_flight(app: str, tmp_path: Path) -> None:
    records = Records(tmp_path / "records")
    config = _config(app)
    handle = _deploy_probe(config, records)
    app_name = f"llm-{app}"
    assert _running_replicas(app_name) == 1
    in_flight = handle.generate.remote(_held("in-flight"))
    # Scale only once the replica is running the request (it holds it until released).
    wait_for(lambda: records.started("in-flight"), "the replica to start the request")
    _deploy_probe(config | {"min_replicas": 2, "max_replicas": 2}, records)
    wait_for(lambda: _running_replicas(app_name) == 2, "a second replica", 60)
    records.release()
    assert in_flight.result(timeout_s=30).text == REPLY
    assert records.tokens("in-flight") == len(REPLY.split())  # run once, on the old replica


def test_overload_is_refused_quickly(app: str) -> None:
    handle = _deploy(
        _config(app, max_batch_size=1, max_queued_requests=1, target_ongoing_requests=1),
        seconds_per_step=0.5,
    )
    responses = [handle.generate.remote(_request()) for _ in range(6)]
    refused = 0
    started = time.monotonic()
    for response in responses:
        try:
            response.result(timeout_s=30)
        except BackPressureError:
            refused += 1
    assert refused >= 3
    assert time.monotonic() - started < 30


def test_a_burst_scales_up_and_back_down(app: str, tmp_path: Path) -> None:
    """Six requests held on the replica (and queued behind it) until the scale-up is
    seen: the load the autoscaler averages is certain, whatever the machine's speed."""
    records = Records(tmp_path / "records")
    config = _config(
        app,
        min_replicas=1,
        max_replicas=3,
        target_ongoing_requests=1,
        max_batch_size=1,
        upscale_delay_s=0.5,
        downscale_delay_s=2.0,
        look_back_period_s=10.5,
    )
    handle = _deploy_probe(config, records)
    app_name = f"llm-{app}"
    burst = [handle.generate.remote(_held(f"burst-{index}")) for index in range(6)]
    # The router may hand any of the six to the replica first.
    wait_for(lambda: any(records.started(f"burst-{i}") for i in range(6)), "a request")

    def scaled_up() -> bool:
        return _running_replicas(app_name) >= 2

    try:
        wait_for(scaled_up, "a burst of 6 held requests to raise replicas above 1", 90)
    except AssertionError:
        import ray

        deployment = serve.status().applications[app_name].deployments[DEPLOYMENT_NAME]
        free, total = ray.available_resources().get("CPU"), ray.cluster_resources().get("CPU")
        pytest.fail(
            f"replicas {deployment.replica_states}, {deployment.message!r}, "
            f"{free} of {total} CPUs free"
        )
    records.release()
    assert all(response.result(timeout_s=60).text == REPLY for response in burst)
    wait_for(lambda: _running_replicas(app_name) == 1, "replicas to come back down", 60)


def test_build_app_is_an_import_path_target() -> None:
    from serve_apps import llm

    assert callable(llm.build_app)
    assert Path(llm.__file__).name == "llm.py"


def test_the_real_engine_serves_the_demo_model(serve_instance: None, demo_model_dir: Path) -> None:
    config = _config("demo-real", model_dir=str(demo_model_dir), max_batch_size=4)
    app_name = LLMAppConfig.model_validate(config).app_name
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    try:
        request = GenerationRequest(
            prompt="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            sampling=SamplingOptions(max_tokens=5),
        )
        results = [r.result() for r in [handle.generate.remote(request) for _ in range(3)]]
        assert len({r.text for r in results}) == 1  # greedy: batched rows agree
        assert all(len(r.token_ids) == 5 for r in results)
        streamed = list(handle.options(stream=True).stream.remote(request))
        assert streamed[-1].text == results[0].text
    finally:
        serve.delete(app_name)
