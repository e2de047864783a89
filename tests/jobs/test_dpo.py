"""The DPO recipe: its loss against trl's on the same batch, its log-probs against a plain
loop, and real 2-worker Ray Train runs on the demo model that learn to prefer the chosen
reply, report to the store, save checkpoints that load back, and resume a new attempt."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from corral.api.post_training import DPOAlignmentConfig, OptimizerConfig
from corral.store import migrate
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.config import DPOJobConfig
from jobs.dpo import (
    dpo_loss,
    main,
    pair_logps,
    prepare_models,
    sequence_logps,
    train_step,
)
from jobs.preference_data import pad_pairs, tokenize_pairs

TENANT = "t"


def _key(job_uuid: str) -> str:
    """The key the store (and the recipe) knows a job by."""
    return job_key(TENANT, job_uuid)


ANSWER = "Corral fine-tunes Llama models on Ray."
REFUSAL = "I do not know."
QUESTIONS = [
    "What is Corral?",
    "What does Corral do?",
    "Tell me about Corral.",
    "Who uses Corral?",
    "Explain Corral in a sentence.",
    "Corral?",
    "What is Corral for?",
    "Describe Corral.",
]


def _row(question: str, *, system: str | None = None) -> dict[str, Any]:
    prompt = [{"role": "system", "content": system}] if system else []
    prompt.append({"role": "user", "content": question})
    return {"prompt": prompt, "chosen": ANSWER, "rejected": REFUSAL}


ROWS = [_row(q) for q in QUESTIONS]
VALIDATION_ROWS = [_row("What is Corral, briefly?", system="Be brief.")]
OPTIMIZER = OptimizerConfig(optimizer_type="adamw", lr=1e-3, lr_min=1e-4, weight_decay=0)
PLAIN = DPOAlignmentConfig(reward_scale=0.1, reward_clip=0, epsilon=0, gamma=0)
PLAIN_05 = PLAIN.model_copy(update={"reward_scale": 0.5})
# Deprecations transformers 5 raises when trl 1.16 reads its old attribute names.
TRL_DEPRECATIONS = ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is")


def _load(model_dir: Path, *, perturb_seed: int | None = None) -> PreTrainedModel:
    """The demo model, or a copy moved away from it so that policy and reference differ."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if perturb_seed is not None:
        generator = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


# ---------------------------------------------------------------- the loss against trl


PARITY_ROWS = [
    _row("What is Corral?"),
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
        ],
        "chosen": "Blue.",
        "rejected": "I would rather talk about something else entirely.",
    },
    _row("Who uses Corral?", system="You are a careful assistant."),
]


@dataclass(frozen=True)
class TrlResult:
    loss: float
    metrics: dict[str, float]
    example: dict[str, Any]  # trl's own tokenization of the first row


def _trl_loss(
    model_dir: Path, rows: list[dict[str, Any]], *, beta: float, loss_type: str, **args: Any
) -> TrlResult:
    """trl's DPOTrainer loss on our own padded batch of `rows` (trl 1.16 keeps the loss
    inside `_compute_loss`, so a real trainer is built around the same two models)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    conversational = [
        {
            "prompt": row["prompt"],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in rows
    ]
    with warnings.catch_warnings():
        for message in TRL_DEPRECATIONS:
            warnings.filterwarnings("ignore", message, FutureWarning)
        trainer = DPOTrainer(
            model=_load(model_dir, perturb_seed=1),
            ref_model=_load(model_dir),
            args=DPOConfig(
                output_dir=str(model_dir.parent / "trl"),
                beta=beta,
                loss_type=[loss_type],
                report_to=[],
                use_cpu=True,
                bf16=False,  # trl's default: its reference would run under bf16 autocast
                **args,
            ),
            train_dataset=Dataset.from_list(conversational),
            processing_class=tokenizer,
        )
        batch = pad_pairs(
            tokenize_pairs(tokenizer, rows, max_seq_len=256), pad_id=tokenizer.pad_token_id
        )
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != -100).long(),
        }
        trainer.model.train()
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return TrlResult(float(loss), metrics, dict(trainer.train_dataset[0]))


def _our_scores(model_dir: Path, rows: list[dict[str, Any]], settings: DPOAlignmentConfig) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    batch = pad_pairs(
        tokenize_pairs(tokenizer, rows, max_seq_len=256), pad_id=tokenizer.pad_token_id
    )
    with torch.no_grad():
        policy = pair_logps(_load(model_dir, perturb_seed=1), batch)
        reference = pair_logps(_load(model_dir), batch)
    return dpo_loss(*policy, *reference, settings), policy


@pytest.mark.slow  # importing trl (and the deepspeed it pulls in) takes 10-20 s
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_trl_sigmoid(demo_model_dir: Path, beta: float) -> None:
    """Same tokens, same two models: trl's sigmoid loss, rewards and log-probs equal ours
    to float32 rounding (rel 1e-5)."""
    trl = _trl_loss(demo_model_dir, PARITY_ROWS, beta=beta, loss_type="sigmoid")
    settings = DPOAlignmentConfig(reward_scale=beta, reward_clip=0, epsilon=0, gamma=0)
    scores, (policy_chosen, policy_rejected) = _our_scores(demo_model_dir, PARITY_ROWS, settings)

    # trl's own tokenization of the conversation is the one we score.
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    [first] = tokenize_pairs(tokenizer, PARITY_ROWS[:1], max_seq_len=256)
    assert trl.example["prompt_ids"] + trl.example["chosen_ids"] == first.chosen.input_ids
    assert trl.example["chosen_ids"] == [t for t in first.chosen.labels if t != -100]

    # The perturbed policy disagrees with the reference, so none of this is trivially log 2.
    assert abs(scores.losses.mean().item() - math.log(2)) > 0.05
    assert scores.losses.mean().item() == pytest.approx(trl.loss, rel=1e-5)
    margins = scores.chosen_rewards - scores.rejected_rewards
    assert margins.mean().item() == pytest.approx(trl.metrics["rewards/margins"], rel=1e-5)
    assert scores.chosen_rewards.mean().item() == pytest.approx(
        trl.metrics["rewards/chosen"], rel=1e-5
    )
    assert (margins > 0).float().mean().item() == trl.metrics["rewards/accuracies"]
    assert policy_chosen.mean().item() == pytest.approx(trl.metrics["logps/chosen"], rel=1e-5)
    assert policy_rejected.mean().item() == pytest.approx(trl.metrics["logps/rejected"], rel=1e-5)


@pytest.mark.slow
def test_label_smoothed_loss_matches_trl(demo_model_dir: Path) -> None:
    """trl 1.16 dropped label smoothing from its "sigmoid" loss; the conservative-DPO form
    -(1-e) logsig(z) - e logsig(-z) lives on in its "aot" loss, whose sort over the batch
    is the identity for a single pair, so pairs are compared one at a time."""
    settings = DPOAlignmentConfig(reward_scale=0.5, reward_clip=0, epsilon=0.2, gamma=0)
    for row in PARITY_ROWS:
        scores, _ = _our_scores(demo_model_dir, [row], settings)
        trl = _trl_loss(demo_model_dir, [row], beta=0.5, loss_type="aot", label_smoothing=0.2)
        assert scores.losses.item() == pytest.approx(trl.loss, rel=1e-5)
        # Smoothing changes the loss: it is not the unsmoothed one.
        assert abs(trl.loss - _our_scores(demo_model_dir, [row], PLAIN_05)[0].losses.item()) > 0.01


def test_margin_clip_and_smoothing_follow_the_documented_formula() -> None:
    """gamma, reward_clip and epsilon have no trl counterpart together: check them against
    the formula written out in plain floats."""
    policy = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -19.0, -40.0])
    reference = torch.tensor([-11.0, -21.0, -6.0]), torch.tensor([-11.0, -21.0, -6.0])
    settings = DPOAlignmentConfig(reward_scale=0.5, reward_clip=1.5, epsilon=0.1, gamma=0.25)
    scores = dpo_loss(*policy, *reference, settings)

    def expected(pc: float, pr: float, rc: float, rr: float) -> float:
        clip = settings.reward_clip
        chosen = max(-clip, min(clip, settings.reward_scale * (pc - rc)))
        rejected = max(-clip, min(clip, settings.reward_scale * (pr - rr)))
        z = chosen - rejected - settings.gamma
        log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        return -(1 - settings.epsilon) * log_sigmoid(z) - settings.epsilon * log_sigmoid(-z)

    for i in range(3):
        args = (policy[0][i], policy[1][i], reference[0][i], reference[1][i])
        want = expected(*(float(a) for a in args))
        assert scores.losses[i].item() == pytest.approx(want, rel=1e-6), i
    # The third pair's rejected reward (-17) is clipped in the loss, so that reply gets no
    # gradient, but it is reported as it is.
    assert scores.rejected_rewards[2].item() == pytest.approx(-17.0)
    rejected = policy[1].clone().requires_grad_(True)
    dpo_loss(policy[0], rejected, *reference, settings).losses.sum().backward()
    assert rejected.grad is not None
    assert rejected.grad[2].item() == 0.0 and rejected.grad[0].item() != 0.0


def test_sequence_logps_match_a_plain_loop(demo_model_dir: Path) -> None:
    """Only reply tokens count, each scored by the logits one position earlier; padding
    and prompt contribute nothing."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    batch = pad_pairs(
        tokenize_pairs(tokenizer, PARITY_ROWS, max_seq_len=256), pad_id=tokenizer.pad_token_id
    )
    model = _load(demo_model_dir, perturb_seed=3)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = sequence_logps(logits, batch["labels"])
    for row in range(batch["input_ids"].shape[0]):
        total = 0.0
        for position in range(1, batch["input_ids"].shape[1]):
            token = int(batch["labels"][row, position])
            if token != -100:
                total += float(torch.log_softmax(logits[row, position - 1].double(), -1)[token])
        assert ours[row].item() == pytest.approx(total, rel=1e-5), row


# ---------------------------------------------------------------- one step, no Ray


def _one_step(model_dir: Path, **settings: Any) -> Any:
    """Two steps on one worker (no process group: the bare model, no DDP), prepared as the
    recipe prepares them."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    batch = pad_pairs(
        tokenize_pairs(tokenizer, ROWS[:2], max_seq_len=256), pad_id=tokenizer.pad_token_id
    )
    config = _config("sqlite://", model_dir, model_dir.parent / "unused", "one", **settings)
    device = torch.device("cpu")
    engine, reference = prepare_models(config, _load(model_dir), total_steps=2, device=device)
    engine.model.train()
    first = train_step(engine, reference, batch, PLAIN, device)
    second = train_step(engine, reference, batch, PLAIN, device)
    return first, second, engine.model


def test_activation_checkpointing_changes_memory_not_results(demo_model_dir: Path) -> None:
    plain_first, plain_second, plain = _one_step(demo_model_dir)
    first, second, checkpointed = _one_step(demo_model_dir, activation_checkpointing=True)
    assert plain_first.loss == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert second.loss == pytest.approx(plain_second.loss, rel=1e-5)
    assert second.loss < first.loss
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_trains_float32_weights(demo_model_dir: Path) -> None:
    first, second, policy = _one_step(demo_model_dir, dtype="bfloat16")
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)  # both under the same autocast
    assert second.loss < first.loss and second.reward_margin > 0
    assert all(p.dtype == torch.float32 for p in policy.parameters())


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("reward_scale", 0.0, "reward_scale"),
        ("epsilon", 0.5, "epsilon"),
        ("epsilon", -0.1, "epsilon"),
        ("gamma", -1.0, "gamma"),
        ("reward_clip", -1.0, "reward_clip"),
        ("reward_scale", math.inf, "finite"),
    ],
)
def test_out_of_range_dpo_settings_are_refused(
    tmp_path: Path, field: str, value: float, message: str
) -> None:
    settings = PLAIN.model_copy(update={field: value})
    with pytest.raises(ValidationError, match=message):
        _config("sqlite://", tmp_path, tmp_path, "bad", dpo=settings)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a"}, "missing column"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": ["b"]},
            "rejected must be a non-empty string",
        ),
        (
            {"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"},
            "end with a user turn",
        ),
    ],
)
def test_malformed_rows_are_refused(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=rf"rows\[1\]: .*{message}"):
        _config("sqlite://", tmp_path, tmp_path, "bad", rows=[ROWS[0], row])


# ---------------------------------------------------------------- on Ray Train


def _config(
    database_url: str, model_dir: Path, output_dir: Path, job_uuid: str, **overrides: Any
) -> DPOJobConfig:
    settings: dict[str, Any] = {
        "job_key": _key(job_uuid),
        "report_to": {"database_url": database_url},
        "model_dir": model_dir,
        "output_dir": output_dir,
        "rows": ROWS,
        "validation_rows": VALIDATION_ROWS,
        "dpo": PLAIN,
        "optimizer": OPTIMIZER,
        "n_epochs": 2,
        "n_iters": 100,
        "batch_size": 1,
        "num_workers": 2,
        "max_seq_len": 128,
    }
    return DPOJobConfig(**(settings | overrides))


def _create(db: Database, job_uuid: str, output_dir: Path) -> None:
    """The job's row, with the directory of its own its launch config names."""
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid=job_uuid,
            tenant=TENANT,
            kind=JobKind.PREFERENCE_OPTIMIZE,
            request={},
            launch={"output_dir": str(output_dir)},
        )


def _stored(db: Database, job_uuid: str) -> tuple[Any, list[str], list[Any]]:
    with db.transaction() as session:
        store = JobStore(session)
        job = store.get(job_uuid, tenant=TENANT)
        lines = [line.line for line in store.log_lines(_key(job_uuid))]
        checkpoints = [(c.iters, c.path, c.metrics) for c in store.checkpoints(_key(job_uuid))]
    return job, lines, checkpoints


def _field(line: str, name: str) -> float:
    match = re.search(rf"\b{name} (\S+)", line)
    assert match is not None, line
    return float(match.group(1))


@pytest.fixture(scope="module")
def module_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """One SQLite store for the module: the resume test continues the first run's job."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dpo-store') / 'corral.db'}"
    migrate.upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.fixture(scope="module")
def first_run(
    ray_cluster: Any,
    module_database: Database,
    demo_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> DPOJobConfig:
    """Two epochs of 4 steps (8 pairs, 2 workers, 1 pair each per step)."""
    output_dir = tmp_path_factory.mktemp("dpo-first")
    _create(module_database, "dpo-first", output_dir)
    config = _config(module_database.url, demo_model_dir, output_dir, "dpo-first")
    main(config)
    return config


@pytest.mark.integration
@pytest.mark.slow
def test_dpo_learns_to_prefer_the_chosen_reply(
    first_run: DPOJobConfig, module_database: Database, demo_model_dir: Path
) -> None:
    job, lines, checkpoints = _stored(module_database, "dpo-first")
    assert job.status == JobStatus.COMPLETED, lines
    assert job.started_at is not None and job.completed_at is not None
    assert job.resources_allocated == {"num_workers": 2, "use_gpu": False}
    assert lines[0] == (
        "attempt 0: dpo on 2 workers (DDP, float32; beta 0.1, epsilon 0.0, gamma 0.0, "
        "reward_clip 0.0)"
    )

    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 8, lines
    # Step 1: the policy is the reference, so the loss is log 2 and there is no margin yet.
    assert re.fullmatch(
        r"step 1 loss 0\.6931 lr 1\.000e-03 tokens/s \d+ reward_accuracy 0\.00 "
        r"reward_margin -?0\.0000",
        steps[0],
    )
    assert _field(steps[-1], "loss") < 0.4, steps
    assert _field(steps[-1], "reward_accuracy") == 1.0
    assert _field(steps[-1], "reward_margin") > 1.0

    validation = [line for line in lines if " validation " in line]
    assert [line.split()[1] for line in validation] == ["0", "1", "2"]
    assert _field(validation[0], "loss") == pytest.approx(math.log(2), abs=1e-4)
    assert _field(validation[-1], "loss") < 0.4, validation
    assert _field(validation[-1], "reward_accuracy") == 1.0
    assert lines[-1] == "done after 8 steps"

    assert [iters for iters, _, _ in checkpoints] == [4, 8]
    for _, path, metrics in checkpoints:
        for name in ("model.safetensors", "tokenizer.json", "trainer_state.pt"):
            assert (Path(path) / name).is_file(), name
        assert set(metrics) == {
            "loss",
            "validation_loss",
            "validation_reward_accuracy",
            "validation_reward_margin",
        }
    last_metrics = checkpoints[-1][2]
    assert last_metrics["validation_loss"] == pytest.approx(
        _field(validation[-1], "loss"), abs=1e-4
    )

    # The figures as data: a row per step, rewards of both replies, validation merged in.
    with module_database.transaction() as session:
        rows = {m.step: m.values for m in JobStore(session).metrics(_key("dpo-first"))}
    assert sorted(rows) == list(range(9))
    assert set(rows[1]) == {
        "loss",
        "learning_rate",
        "tokens_per_second",
        "reward_accuracy",
        "reward_margin",
        "chosen_reward",
        "rejected_reward",
    }
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[8]["chosen_reward"] - rows[8]["rejected_reward"] == pytest.approx(
        rows[8]["reward_margin"], abs=1e-5
    )
    assert rows[0]["validation_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[8]["validation_reward_margin"] == pytest.approx(
        last_metrics["validation_reward_margin"]
    )

    # The saved policy loads as a plain causal LM and, scored against the original model,
    # prefers the chosen reply by the margin the job reported.
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[-1][1], local_files_only=True)
    tuned = AutoModelForCausalLM.from_pretrained(checkpoints[-1][1], local_files_only=True)
    batch = pad_pairs(
        tokenize_pairs(tokenizer, VALIDATION_ROWS, max_seq_len=128), pad_id=tokenizer.pad_token_id
    )
    with torch.no_grad():
        scores = dpo_loss(
            *pair_logps(tuned, batch), *pair_logps(_load(demo_model_dir), batch), PLAIN
        )
    margin = (scores.chosen_rewards - scores.rejected_rewards).item()
    assert margin == pytest.approx(last_metrics["validation_reward_margin"], rel=1e-3)


@pytest.mark.integration
@pytest.mark.slow
def test_a_new_attempt_resumes_from_the_last_checkpoint(
    first_run: DPOJobConfig, module_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """Attempt 1 of the same job whose last checkpoint row is the first run's epoch 1:
    only epoch 2 runs, on the resumed policy, optimizer and schedule, against the
    original reference."""
    _, _, first_checkpoints = _stored(module_database, "dpo-first")
    iters, path, _ = first_checkpoints[0]
    _create(module_database, "dpo-resumed", tmp_path)
    with module_database.transaction() as session:
        store = JobStore(session)
        store.transition(_key("dpo-resumed"), to=JobStatus.RUNNING)
        store.add_checkpoint(_key("dpo-resumed"), iters=iters, path=path)
        store.transition(_key("dpo-resumed"), to=JobStatus.SCHEDULED)  # requeued: attempt 1
    main(_config(module_database.url, demo_model_dir, tmp_path, "dpo-resumed"))

    job, lines, checkpoints = _stored(module_database, "dpo-resumed")
    assert job.status == JobStatus.COMPLETED, lines
    assert lines[0].startswith("attempt 1: dpo on 2 workers")
    assert lines[0].endswith(f", resuming from {path}"), lines[0]
    assert f"resumed at step 4 from {path}" in lines
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["5", "6", "7", "8"]
    # The cosine schedule resumes half way: lr_min + (lr - lr_min) / 2.
    assert " lr 5.500e-04 " in steps[0]
    # A fresh policy (or a reference loaded from the checkpoint) would start at log 2.
    assert _field(steps[0], "loss") < 0.6
    # The resumed epoch retraces the uninterrupted run's second epoch step for step.
    _, first_lines, _ = _stored(module_database, "dpo-first")
    uninterrupted = [line for line in first_lines if line.startswith("step ")][4:]
    for resumed, original in zip(steps, uninterrupted, strict=True):
        for name in ("loss", "lr", "reward_accuracy", "reward_margin"):
            assert _field(resumed, name) == pytest.approx(_field(original, name), abs=2e-4)
    assert not any(line.startswith("epoch 0 ") for line in lines)
    assert [i for i, _, _ in checkpoints] == [4, 8]
    assert (tmp_path / "ray" / f"{_key('dpo-resumed')}-attempt-1").is_dir()


@pytest.mark.integration
@pytest.mark.slow
def test_zero3_bf16_trains_and_saves_a_loadable_policy(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """DeepSpeed ZeRO-3 in bf16: the policy's weights are sharded and held in bf16, the
    reference is bf16 too (so step 1 is exactly log 2), and the saved weights are gathered
    into one loadable checkpoint."""
    _create(sqlite_database, "dpo-zero3", tmp_path)
    config = _config(
        sqlite_database.url,
        demo_model_dir,
        tmp_path,
        "dpo-zero3",
        zero_stage=3,
        dtype="bfloat16",
        n_epochs=1,
        n_iters=2,
    )
    main(config)
    job, lines, checkpoints = _stored(sqlite_database, "dpo-zero3")
    assert job.status == JobStatus.COMPLETED, lines
    assert "(DeepSpeed ZeRO-3, bfloat16; beta 0.1," in lines[0]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2, lines
    assert _field(steps[0], "loss") == pytest.approx(math.log(2), abs=1e-4)
    assert _field(steps[1], "loss") < _field(steps[0], "loss")
    [(iters, path, _)] = checkpoints
    assert iters == 2 and (Path(path) / "deepspeed").is_dir()
    tuned = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    original = _load(demo_model_dir)
    assert set(tuned.state_dict()) == set(original.state_dict())
    changed = [
        name
        for name, tensor in tuned.state_dict().items()
        if not torch.equal(tensor.float(), original.state_dict()[name].float())
    ]
    assert changed, "the saved policy is the untouched model"


def test_a_cancelled_job_does_not_train(
    sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    _create(sqlite_database, "dpo-cancelled", tmp_path / "out")
    with sqlite_database.transaction() as session:
        JobStore(session).transition(_key("dpo-cancelled"), to=JobStatus.CANCELLED)
    main(_config(sqlite_database.url, demo_model_dir, tmp_path / "out", "dpo-cancelled"))
    job, lines, _ = _stored(sqlite_database, "dpo-cancelled")
    assert job.status == JobStatus.CANCELLED and lines == []
    assert not (tmp_path / "out").exists()
