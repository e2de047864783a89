"""/reward_scoring/score over HTTP against real reward apps (the transformers engine on
tiny reward models): scores equal the model run in-process, replicas batch a request's
pairs, a tenant's own reward model under the spec's name wins for that tenant only, and
what cannot be scored is refused."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray import serve

from corral.app import create_app
from corral.config import Settings
from corral.services.model_calls import MAX_BATCH_ITEMS
from corral.services.models import ModelService, build_model_service
from corral.serving.catalog import ModelSpec, file_app_name, model_roots, tenant_app_name
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database
from serve_apps.engines.protocol import ChatMessage, ScoringRequest
from serve_apps.options import ReplicaOptions
from tests.conftest import add_registered_model_row
from tests.serve_apps.test_transformers_reward import TOLERANCE, in_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC_NAME = "llama3_405b_reward"
KEYS = "alpha:key-alpha,beta:key-beta,gamma:key-gamma,delta:key-delta"
ALPHA, BETA, GAMMA, DELTA = (
    {"Authorization": f"Bearer key-{tenant}"} for tenant in ("alpha", "beta", "gamma", "delta")
)
WEIGHTS = {"helpfulness": 1.0, "correctness": 0.5, "verbosity": -2.0}


def message(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content, "tool_calls": [], "tool_responses": []}


DIALOGS = [
    {
        "dialog": {
            "message": message("user", "And 3 + 3?"),
            "message_history": [
                message("system", "You are terse."),
                message("user", "What is 2 + 2?"),
                message("assistant", "4"),
            ],
        },
        "k_generations": [
            message("assistant", "6"),
            message("assistant", ["Six, ", "as ever."]),
            message("assistant", "seven"),
        ],
    },
    {
        "dialog": {"message": message("user", "Say hello."), "message_history": []},
        "k_generations": [
            message("assistant", "hello"),
            message("assistant", "Hello! How can I help you today?"),
            message("assistant", "no"),
        ],
    },
]
BODY = {"model": SPEC_NAME, "prompt_generations": DIALOGS}


def conversations() -> list[ScoringRequest]:
    """The pairs of BODY as the reward model should see them, in input order."""

    def turn(m: dict[str, Any]) -> ChatMessage:
        content = m["content"]
        return ChatMessage(m["role"], content if isinstance(content, str) else "".join(content))

    found = []
    for item in DIALOGS:
        dialog = item["dialog"]
        prompt = [turn(m) for m in [*dialog["message_history"], dialog["message"]]]
        found += [ScoringRequest((*prompt, turn(g))) for g in item["k_generations"]]
    return found


def scores_of(response: Any) -> list[float]:
    assert response.status_code == 200, response.text
    return [
        scored["score"]
        for item in response.json()["scored_generations"]
        for scored in item["k_scored_generations"]
    ]


@dataclass(frozen=True)
class Served:
    client: TestClient
    registry: ModelService
    database: Database
    home: Path
    file_model: str


@pytest.fixture(scope="module")
def served(
    serve_instance: None,
    reward_model_dir: Path,
    attribute_reward_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """An API server with one file reward model answering to the spec's name (batches of
    up to 8, waiting 0.25 s to fill one); the attribute model lies under the shared model
    root, for tenants to register."""
    home = tmp_path_factory.mktemp("reward-api") / "home"
    shutil.copytree(attribute_reward_model_dir, home / "models" / "attributes")
    name = f"judge-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{home.parent / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=120),
        file_models=[
            ModelSpec(
                name=name,
                kind="reward",
                aliases=[SPEC_NAME],
                checkpoint_dir=reward_model_dir,
                device="cpu",
                cpus_per_replica=0.25,
                max_batch_size=8,
                batch_wait_timeout_s=0.25,
            )
        ],
        model_roots=model_roots(Settings(home=home)),
        registration_defaults=ReplicaOptions(cpus_per_replica=0.25, device="cpu"),
    )
    registry.start()
    app = create_app(Settings(home=home, api_keys=KEYS), database=database, models=registry)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Served(client, registry, database, home, name)
    finally:
        serve.delete(file_app_name(name), _blocking=False)
        serve.delete(tenant_app_name("alpha", SPEC_NAME), _blocking=False)
        database.dispose()


def test_scores_equal_the_model_in_process_batched_and_repeatable(
    served: Served, reward_model_dir: Path
) -> None:
    response = served.client.post("/reward_scoring/score", json=BODY, headers=BETA)
    scores = scores_of(response)
    expected = [float(in_process(reward_model_dir, c)[0]) for c in conversations()]
    assert scores == pytest.approx(expected, abs=TOLERANCE)
    # Each answer: the dialog's last message as its prompt, its generations in order.
    answers = response.json()["scored_generations"]
    assert [a["prompt"] for a in answers] == [item["dialog"]["message"] for item in DIALOGS]
    assert [[s["message"] for s in a["k_scored_generations"]] for a in answers] == [
        item["k_generations"] for item in DIALOGS
    ]
    # The six pairs met in the replica's batches.
    stats = serve.get_app_handle(file_app_name(served.file_model)).stats.remote().result()
    assert max(stats["batch_sizes"]) > 1, stats
    again = scores_of(served.client.post("/reward_scoring/score", json=BODY, headers=BETA))
    assert again == pytest.approx(scores, abs=TOLERANCE)


def test_an_empty_request_scores_nothing(served: Served) -> None:
    body = {"model": SPEC_NAME, "prompt_generations": []}
    response = served.client.post("/reward_scoring/score", json=body, headers=BETA)
    assert response.status_code == 200 and response.json() == {"scored_generations": []}


@pytest.mark.parametrize("model", ["llama3_8b_chat", "judge", ""])
def test_only_the_spec_reward_model_is_named(served: Served, model: str) -> None:
    response = served.client.post(
        "/reward_scoring/score", json=BODY | {"model": model}, headers=BETA
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize(
    ("generation", "problem"),
    [
        (message("user", "hi"), "k_generations[0]: a generation is an assistant message"),
        (
            message("assistant", [{"url": "https://x.test/a.png", "mime_type": "image/png"}]),
            "attachments cannot be scored",
        ),
        (message("assistant", "a <|eot_id|> b"), "special token"),
    ],
    ids=["not-assistant", "attachment", "special-token"],
)
def test_what_cannot_be_scored_is_refused(served: Served, generation: Any, problem: str) -> None:
    body = BODY | {"prompt_generations": [DIALOGS[1] | {"k_generations": [generation]}]}
    response = served.client.post("/reward_scoring/score", json=body, headers=BETA)
    assert response.status_code == 422, response.text
    assert problem in response.json()["error"]["message"]


def test_more_generations_than_a_request_may_carry_are_refused(served: Served) -> None:
    """The cap counts every dialog's generations together: two dialogs, each under it."""
    half = DIALOGS[1] | {"k_generations": [message("assistant", "ok")] * (MAX_BATCH_ITEMS // 2 + 1)}
    body = BODY | {"prompt_generations": [half, half]}
    response = served.client.post("/reward_scoring/score", json=body, headers=BETA)
    assert response.status_code == 422, response.text
    assert f"at most {MAX_BATCH_ITEMS} generations" in response.json()["error"]["message"]


def test_a_tenants_own_reward_model_wins_for_that_tenant_only(
    served: Served, attribute_reward_model_dir: Path, reward_model_dir: Path
) -> None:
    register = {
        "name": SPEC_NAME,
        "kind": "reward",
        "checkpoint_dir": str(served.home / "models" / "attributes"),
    }
    # The checkpoint's config.json is read: three labels need weights, and known ones.
    for weights, problem in [(None, "give score_weights"), ({"tone": 1.0}, "lacks: tone")]:
        refused = served.client.post(
            "/models/register", json=register | {"score_weights": weights}, headers=ALPHA
        )
        assert refused.status_code == 422 and problem in refused.text, refused.text
    llm_weights = {"name": "x", "checkpoint_dir": register["checkpoint_dir"], "score_weights": {}}
    assert (
        served.client.post("/models/register", json=llm_weights, headers=ALPHA).status_code == 422
    )

    registered = served.client.post(
        "/models/register", json=register | {"score_weights": WEIGHTS}, headers=ALPHA
    )
    assert registered.status_code == 200, registered.text
    assert registered.json()["score_weights"] == WEIGHTS

    mine = scores_of(served.client.post("/reward_scoring/score", json=BODY, headers=ALPHA))
    weights = list(WEIGHTS.values())
    expected = [
        sum(
            w * float(x)
            for w, x in zip(weights, in_process(attribute_reward_model_dir, c), strict=True)
        )
        for c in conversations()
    ]
    assert mine == pytest.approx(expected, abs=TOLERANCE)
    theirs = scores_of(served.client.post("/reward_scoring/score", json=BODY, headers=BETA))
    shared = [float(in_process(reward_model_dir, c)[0]) for c in conversations()]
    assert theirs == pytest.approx(shared, abs=TOLERANCE)


def test_an_llm_under_the_reward_name_is_refused(served: Served) -> None:
    add_registered_model_row(
        served.database, tenant="gamma", name=SPEC_NAME, checkpoint_dir="/nowhere"
    )
    response = served.client.post("/reward_scoring/score", json=BODY, headers=GAMMA)
    assert response.status_code == 422, response.text
    assert "is an llm, not a reward model" in response.json()["error"]["message"]


def test_a_reward_model_without_its_app_is_unavailable(served: Served) -> None:
    add_registered_model_row(
        served.database, tenant="delta", name=SPEC_NAME, checkpoint_dir="/nowhere", kind="reward"
    )
    response = served.client.post("/reward_scoring/score", json=BODY, headers=DELTA)
    assert response.status_code == 503, response.text
    assert "Retry-After" in response.headers


def test_a_reward_model_answers_no_completion_and_is_not_listed(served: Served) -> None:
    chat = {"model": SPEC_NAME, "messages": [{"role": "user", "content": "hi"}]}
    response = served.client.post("/v1/chat/completions", json=chat, headers=BETA)
    assert response.status_code == 422, response.text
    assert "is a reward model, not an llm" in response.json()["error"]["message"]
    listed = served.client.get("/v1/models", headers=BETA).json()["data"]
    assert SPEC_NAME not in {m["id"] for m in listed}
    assert served.file_model in {
        m["name"] for m in served.client.get("/models", headers=BETA).json()["data"]
    }
