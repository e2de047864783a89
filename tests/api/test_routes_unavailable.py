"""Operations whose engine is not in this build (or not wired into this server: memory
banks without a vector store) get 501 for a valid request, naming the missing
capability, never a fake success; an invalid one still gets 422 first."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from corral.api.agentic_system import (
    AgenticSystemCreateRequest,
    AgenticSystemExecuteRequest,
    AgenticSystemTurn,
    MemoryRetrievalStep,
    ModelInferenceStep,
    SafetyFilteringStep,
    SafetyViolation,
    ToolExecutionStep,
)
from corral.api.common import (
    Attachment,
    Dialog,
    Message,
    SamplingParams,
    ShieldConfig,
    ToolCall,
    ToolDefinition,
    ToolResponse,
)
from corral.api.datasets import Dataset
from corral.api.inference import (
    BatchChatCompletionRequest,
    BatchCompletionRequest,
    ChatCompletionRequest,
    CompletionRequest,
)
from corral.api.memory_banks import (
    ConfigureMemoryBankRequest,
    MemoryBankDocument,
    MemoryBankQueryRequest,
)
from corral.api.post_training import (
    DPOAlignmentConfig,
    LoraFinetuningConfig,
    OptimizerConfig,
    PostTrainingRLHFRequest,
    PostTrainingSFTRequest,
    TrainingConfig,
)
from corral.api.reward_scoring import DialogGenerations, RewardScoringRequest
from corral.api.synthetic_data_generation import (
    SyntheticDataGenerationRequest,
    SyntheticDataJobRequest,
)
from corral.app import create_app
from corral.config import Settings
from corral.store import migrate
from corral.store.db import Database

# Operations that work in this build; every other route must be listed in CASES below.
AVAILABLE = {
    "POST /datasets/create",
    "GET /datasets/get",
    "DELETE /datasets/delete",
    "GET /post_training/job/status",
    "GET /post_training/job/logs",
    "GET /post_training/job/artifacts",
    # Corral's own model management (501 without a Ray connection is tested with it).
    "GET /models",
    "POST /models/register",
    "POST /models/scale",
    "DELETE /models/delete",
    # Corral's own job routes read and change the store only.
    "GET /post_training/jobs",
    "GET /post_training/job",
    "POST /post_training/job/cancel",
    "GET /post_training/job/metrics",
    "GET /jobs",
    "GET /jobs/{job_uuid}",
    "GET /jobs/{job_uuid}/logs",
    "GET /jobs/{job_uuid}/metrics",
    "POST /jobs/{job_uuid}/cancel",
}

SHIELD = ShieldConfig(shield_type="llama_guard", params={"threshold": 0.5})
MESSAGE = Message(
    role="user",
    content=["Describe this picture", Attachment(url="file:///tmp/cat.png", mime_type="image/png")],
    tool_calls=[],
    tool_responses=[],
)
REPLY = Message(
    role="assistant",
    content="A cat.",
    tool_calls=[ToolCall(tool_name="web_search", arguments={"query": "cats", "n": 3})],
    tool_responses=[ToolResponse(tool_name="web_search", content="three cats")],
)
DIALOG = Dialog(message=MESSAGE, message_history=[REPLY])
TEXT_REPLY = Message(role="assistant", content="A cat.", tool_calls=[], tool_responses=[])
TEXT_DIALOG = Dialog(
    message=Message(role="user", content="And a dog?", tool_calls=[], tool_responses=[]),
    message_history=[TEXT_REPLY],
)
SAMPLING = SamplingParams(temperature=0.0, strategy="greedy", top_p=0.95, top_k=0)
TOOL = ToolDefinition(tool_name="web_search", input_shields=[SHIELD], output_shields=[])
DOCUMENT = MemoryBankDocument(
    uuid="doc-1",
    content=base64.b64encode(b"hello").decode(),
    metadata={"source": "test", "page": 1},
    mime_type="text/plain",
)
DATASET = Dataset(columns={"dialog": "dialog"}, content_url="file:///tmp/train.jsonl", metadata={})
OPTIMIZER = OptimizerConfig(optimizer_type="adamw", lr=1e-4, lr_min=0.0, weight_decay=0.0)
TRAINING = TrainingConfig(
    n_epochs=1,
    batch_size=2,
    shuffle=True,
    n_iters=10,
    enable_activation_checkpointing=False,
    memory_efficient_fsdp_wrap=False,
    fsdp_cpu_offload=False,
)
TURN = AgenticSystemTurn(
    user_messages=[MESSAGE],
    steps=[
        ModelInferenceStep(step_type="model_inference", uuid="s1", text="thinking"),
        ToolExecutionStep(
            step_type="tool_execution",
            uuid="s2",
            tool_calls=REPLY.tool_calls,
            tool_responses=REPLY.tool_responses,
        ),
        SafetyFilteringStep(
            step_type="safety_filtering",
            uuid="s3",
            violation=SafetyViolation(violation_type="none", details="clean"),
        ),
        MemoryRetrievalStep(
            step_type="memory_retrieval", uuid="s4", documents=[DOCUMENT], scores=[0.9]
        ),
    ],
    response_message=REPLY,
)


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    capability: str
    body: BaseModel | Sequence[BaseModel | str] | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"

    def json_body(self) -> Any:
        if self.body is None:
            return None
        if isinstance(self.body, BaseModel):
            return _dump(self.body)
        return [_dump(item) if isinstance(item, BaseModel) else item for item in self.body]


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_none=True)


CASES = [
    Case(
        "POST",
        "/inference/completion",
        "inference",
        CompletionRequest(
            content="Once upon a time",
            model="llama3_8b",
            sampling_params=SAMPLING,
            max_tokens=16,
            stream=False,
            logprobs=False,
        ),
    ),
    Case(
        "POST",
        "/inference/chat_completion",
        "inference",
        ChatCompletionRequest(
            model="llama3_8b_chat",
            dialog=DIALOG,
            sampling_params=SAMPLING,
            available_tools=[TOOL],
            max_tokens=0,
            stream=False,
            logprobs=False,
        ),
    ),
    Case(
        "POST",
        "/inference/batch_completion",
        "inference",
        BatchCompletionRequest(
            model="llama3_70b",
            content_batch=["a", ["b", Attachment(url="data:text/plain,c", mime_type="text/plain")]],
            sampling_params=SAMPLING,
            max_tokens=0,
            logprobs=True,
        ),
    ),
    Case(
        "POST",
        "/inference/batch_chat_completion",
        "inference",
        BatchChatCompletionRequest(
            model="llama3_70b_chat",
            batch_dialogs=[DIALOG, DIALOG],
            sampling_params=SAMPLING,
            available_tools=[],
            max_tokens=0,
            logprobs=False,
        ),
    ),
    Case(
        "POST",
        "/agentic_system/create",
        "agentic_system",
        AgenticSystemCreateRequest(
            uuid="agent-1",
            instructions="Be brief.",
            model="llama3_8b_chat",
            available_tools=[TOOL],
            executable_tools=["web_search"],
            memory_bank_uuids=["bank-1"],
            input_shields=[SHIELD],
            output_shields=[],
        ),
    ),
    Case(
        "POST",
        "/agentic_system/execute",
        "agentic_system",
        AgenticSystemExecuteRequest(
            agent_uuid="agent-1", messages=[MESSAGE], turn_history=[TURN], stream=False
        ),
    ),
    Case("DELETE", "/agentic_system/delete", "agentic_system", params={"agent_id": "agent-1"}),
    Case(
        "POST",
        "/memory_banks/create",
        "memory_banks",
        [DOCUMENT],
        params={"bank_uuid": "bank-1", "bank_name": "notes"},
    ),
    Case("GET", "/memory_banks/get", "memory_banks"),
    Case("DELETE", "/memory_banks/drop", "memory_banks", params={"bank_uuid": "bank-1"}),
    Case("POST", "/memory_bank/insert", "memory_banks", [DOCUMENT], {"bank_uuid": "bank-1"}),
    Case("POST", "/memory_bank/update", "memory_banks", [DOCUMENT], {"bank_uuid": "bank-1"}),
    Case("POST", "/memory_bank/delete", "memory_banks", ["doc-1"], {"bank_uuid": "bank-1"}),
    Case("POST", "/memory_bank/get", "memory_banks", ["doc-1"], {"bank_uuid": "bank-1"}),
    # Corral's own memory bank routes: 501 too without a vector store.
    Case(
        "POST",
        "/memory_banks/configure",
        "memory_banks",
        ConfigureMemoryBankRequest(bank_uuid="bank-1", bank_name="notes", chunk_tokens=64),
    ),
    Case("GET", "/memory_banks/settings", "memory_banks", params={"bank_uuid": "bank-1"}),
    Case(
        "POST",
        "/memory_bank/query",
        "memory_banks",
        MemoryBankQueryRequest(bank_uuid="bank-1", query="cats", metadata_filter={"k": 1}),
    ),
    Case(
        "POST",
        "/reward_scoring/score",
        "reward_scoring",
        # Text only: a template's turn carries no attachment or tool call (422 otherwise).
        RewardScoringRequest(
            prompt_generations=[DialogGenerations(dialog=TEXT_DIALOG, k_generations=[TEXT_REPLY])],
            model="llama3_405b_reward",
        ),
    ),
    Case(
        "POST",
        "/synthetic_data_generation/generate",
        "synthetic_data_generation",
        SyntheticDataGenerationRequest(prompts=[MESSAGE], filtering_function="top_k"),
    ),
    Case(
        "POST",
        "/synthetic_data_generation/jobs",
        "synthetic_data_generation",
        SyntheticDataJobRequest(job_uuid="gen-1", prompts=[MESSAGE], filtering_function="top_k"),
    ),
    # Submission needs Ray (the launcher) and the model registry; without them, 501.
    Case(
        "POST",
        "/post_training/supervised_fine_tune/",
        "post_training.supervised_fine_tune",
        PostTrainingSFTRequest(
            job_uuid="job-1",
            model="llama3_8b",
            dataset=DATASET,
            validation_dataset=DATASET,
            algorithm="lora",
            algorithm_config=LoraFinetuningConfig(
                lora_attn_modules=["q_proj", "v_proj"],
                apply_lora_to_mlp=False,
                apply_lora_to_output=False,
                rank=8,
                alpha=16,
            ),
            optimizer_config=OPTIMIZER,
            training_config=TRAINING,
            hyperparam_search_config={},
            logger_config={},
        ),
    ),
    Case(
        "POST",
        "/post_training/preference_optimize/",
        "post_training.preference_optimize",
        PostTrainingRLHFRequest(
            job_uuid="job-2",
            finetuned_model="file:///tmp/checkpoints/job-1",
            dataset=DATASET,
            validation_dataset=DATASET,
            algorithm="dpo",
            algorithm_config=DPOAlignmentConfig(
                reward_scale=1.0, reward_clip=5.0, epsilon=0.1, gamma=0.99
            ),
            optimizer_config=OPTIMIZER,
            training_config=TRAINING,
            hyperparam_search_config={},
            logger_config={},
        ),
    ),
]


def _invalid_variants(case: Case) -> Iterator[tuple[str, dict[str, str], Any]]:
    """(what is wrong, query parameters, JSON body) for requests that must get 422."""
    body = case.json_body()
    if isinstance(body, dict):
        yield "unknown field", case.params, {**body, "unexpected_field": 1}
        yield "empty object", case.params, {}
    elif isinstance(body, list):
        first = body[0]
        wrong = {**first, "unexpected_field": 1} if isinstance(first, dict) else {"id": first}
        yield "bad list item", case.params, [wrong]
        yield "not a list", case.params, {"items": body}
    for name in case.params:
        params = {key: value for key, value in case.params.items() if key != name}
        yield f"no {name}", params, body


INVALID = [
    pytest.param(case, params, body, id=f"{case.name} ({what})")
    for case in CASES
    for what, params, body in _invalid_variants(case)
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for the module: none of these requests writes anything."""
    home = tmp_path_factory.mktemp("corral-home")
    url = f"sqlite:///{home / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    app = create_app(Settings(home=home), database=database)
    with TestClient(app) as test_client:
        yield test_client
    database.dispose()


def _send(client: TestClient, case: Case, params: dict[str, str], body: Any) -> Any:
    if body is None:
        return client.request(case.method, case.path, params=params)
    return client.request(case.method, case.path, params=params, json=body)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_valid_request_is_answered_501_naming_the_capability(
    client: TestClient, case: Case
) -> None:
    response = _send(client, case, case.params, case.json_body())
    assert response.status_code == 501, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "not_implemented"
    assert error["capability"] == case.capability
    assert case.capability in error["message"]


@pytest.mark.parametrize(("case", "params", "body"), INVALID)
def test_an_invalid_request_is_answered_422_before_the_capability_check(
    client: TestClient, case: Case, params: dict[str, str], body: Any
) -> None:
    response = _send(client, case, params, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


def test_every_route_is_either_available_or_listed_here(tmp_path: Path) -> None:
    paths = create_app(Settings(home=tmp_path)).openapi()["paths"]
    routes = {f"{method.upper()} {path}" for path, item in paths.items() for method in item}
    listed = {case.name for case in CASES}
    assert AVAILABLE.isdisjoint(listed)
    assert routes == AVAILABLE | listed
