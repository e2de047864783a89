"""The SFT recipe on Ray Train against a plain single-process peft + torch loop: on the
same rows and seed, the first steps' losses the recipe logs to the store match."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.config import SFTJobConfig
from jobs.sft import main
from tests.conftest import PEFT_DEPRECATION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 7
LR, LR_MIN = 3e-3, 3e-4
WORKERS, BATCH, STEPS = 2, 2, 4
RANK, ALPHA = 8, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
# Losses are logged to 4 decimals (rounding: at most 5e-5); the rest is float32 summed in
# another order on each side. Measured: at most 4.5e-5 apart, no more than the rounding.
TOLERANCE = 2e-4

# Answers of different lengths, so the workers' token counts differ and the way their
# losses are combined matters; some dialogs have two assistant turns, some no system.
QA = [
    ("What is two plus three?", "Two plus three is five."),
    ("What color is the sky?", "On a clear day the sky is blue."),
    ("Translate hello into Spanish.", "Hola."),
    ("How many days are in a week?", "There are seven days in a week, from Monday to Sunday."),
    ("Who wrote this letter?", "I am not sure, but the name at the bottom may tell us."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("Where should I start?", "Start with the first step and check each result."),
    ("Is it going to rain today?", "Please check a forecast."),
]


def _rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for index in range(WORKERS * BATCH * STEPS):
        question, answer = QA[index % len(QA)]
        dialog: list[dict[str, str]] = []
        if index % 3:
            dialog.append({"role": "system", "content": f"You are assistant number {index}."})
        dialog += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if index % 5 == 0:
            follow_up, reply = QA[(index + 3) % len(QA)]
            dialog += [
                {"role": "user", "content": follow_up},
                {"role": "assistant", "content": reply},
            ]
        rows.append({"dialog": dialog})
    return rows


# ---------------------------------------------------------------- the reference


def render(dialog: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The Llama 3 prompt format written out by hand, as (text, trained) pieces: only an
    assistant's reply and its <|eot_id|> are trained, never a header."""
    pieces = [("<|begin_of_text|>", False)]
    for message in dialog:
        pieces.append((f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n", False))
        pieces.append((message["content"].strip() + "<|eot_id|>", message["role"] == "assistant"))
    return pieces


def encode(tokenizer: Any, dialog: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered dialog and, per token, whether it is trained."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained in render(dialog):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        trained += [is_trained] * len(piece)
    return ids, trained


def row_loss(model: torch.nn.Module, ids: list[int], trained: list[bool]) -> tuple[Any, int]:
    """Summed cross entropy of predicting each trained token from the ones before it."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    targets = torch.tensor(ids[1:])
    keep = torch.tensor(trained[1:])
    losses = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
    return losses[keep].sum(), int(keep.sum())


def cosine_lr(step: int, total: int) -> float:
    return LR_MIN + (LR - LR_MIN) * 0.5 * (1 + math.cos(math.pi * step / total))


def reference_losses(
    model_dir: Path,
    rows: list[dict[str, Any]],
    *,
    combine: Callable[[list[tuple[Any, int]]], Any] | None = None,
    lr_at: Callable[[int, int], float] = cosine_lr,
    trained_tokens: Callable[[list[bool]], list[bool]] = lambda trained: trained,
) -> list[tuple[float, float]]:
    """(loss, lr) of each step of a single-process loop that optimizes what the recipe's
    data-parallel workers optimize together.

    Without shuffling, DistributedSampler deals row i to worker i % WORKERS, and each
    worker takes its next BATCH rows per step. Each worker's loss is the token-weighted
    mean over its own rows; DDP averages the workers' gradients, so the objective is the
    mean of the workers' means. The logged loss is the token-weighted mean over all of
    the step's rows. The keyword arguments swap a piece out, to check that the test
    notices when one is wrong.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoded = [encode(tokenizer, row["dialog"]) for row in rows]
    torch.manual_seed(SEED)  # as the recipe does before it builds the model
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", PEFT_DEPRECATION, FutureWarning)
        model = get_peft_model(base, lora)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    shards = [encoded[rank::WORKERS] for rank in range(WORKERS)]
    logged = []
    for step in range(STEPS):
        per_worker = []
        for shard in shards:
            batch = shard[step * BATCH : (step + 1) * BATCH]
            sums_counts = [row_loss(model, ids, trained_tokens(mask)) for ids, mask in batch]
            per_worker.append((sum(s for s, _ in sums_counts), sum(c for _, c in sums_counts)))
        if combine is None:
            objective = sum(s / c for s, c in per_worker) / WORKERS
        else:
            objective = combine(per_worker)
        lr = lr_at(step, STEPS)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        total = sum(s.item() for s, _ in per_worker) / sum(c for _, c in per_worker)
        logged.append((total, lr))
    return logged


# ---------------------------------------------------------------- the test


def _recipe_losses(
    db: Database, model_dir: Path, output_dir: Path, rows: list[dict[str, Any]]
) -> list[tuple[float, float]]:
    job_uuid = "sft-parity"
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid=job_uuid,
            tenant="t",
            kind=JobKind.SUPERVISED_FINE_TUNE,
            request={},
            launch={"output_dir": str(output_dir)},
        )
    config = SFTJobConfig(
        job_key=job_key("t", job_uuid),
        report_to={"database_url": db.url},
        model_dir=model_dir,
        output_dir=output_dir,
        rows=rows,
        validation_rows=rows[:2],
        algorithm="lora",
        adapter=LoraFinetuningConfig(
            lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=True,
            rank=RANK,
            alpha=ALPHA,
        ),
        optimizer=OptimizerConfig(optimizer_type="adamw", lr=LR, lr_min=LR_MIN, weight_decay=0),
        n_epochs=1,
        n_iters=STEPS,
        batch_size=BATCH,
        shuffle=False,
        seed=SEED,
        num_workers=WORKERS,
    )
    main(config)
    with db.transaction() as session:
        store = JobStore(session)
        status = store.status_of(job_key("t", job_uuid))
        lines = [line.line for line in store.log_lines(job_key("t", job_uuid))]
    assert status == JobStatus.COMPLETED, lines
    steps = [re.match(r"step (\d+) loss (\S+) lr (\S+) ", line) for line in lines]
    found = [match for match in steps if match is not None]
    assert [int(match.group(1)) for match in found] == list(range(1, STEPS + 1)), lines
    return [(float(match.group(2)), float(match.group(3))) for match in found]


def test_first_steps_match_a_plain_peft_loop(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """Both sides seed LoRA's init with SEED and see the same rows in the same order.

    Tolerance: 2e-4 absolute per step. The recipe logs losses to 4 decimals (a rounding
    error of at most 5e-5), and the two sides sum float32 values in different orders
    (padded batches vs single rows, gloo's all-reduce); the largest difference measured
    was 4.5e-5. A wrong loss mask, lr schedule or way of combining the workers' losses
    moves at least one of these losses by more than 1.5e-3 (the next test).
    """
    rows = _rows()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    for row in rows:  # the hand-written rendering is the model's own chat template
        by_hand = "".join(text for text, _ in render(row["dialog"]))
        assert by_hand == tokenizer.apply_chat_template(row["dialog"], tokenize=False)

    expected = reference_losses(demo_model_dir, rows)
    logged = _recipe_losses(sqlite_database, demo_model_dir, tmp_path / "out", rows)

    differences = [abs(got - want) for (got, _), (want, _) in zip(logged, expected, strict=True)]
    assert max(differences) <= TOLERANCE, (logged, expected)
    for (_, got_lr), (_, want_lr) in zip(logged, expected, strict=True):
        assert got_lr == pytest.approx(want_lr, rel=1e-3)  # lr is logged to 4 digits
    assert expected[-1][0] < expected[0][0]  # it learned something in four steps


def _without_eot(trained: list[bool]) -> list[bool]:
    """A mask that trains each assistant reply but not the <|eot_id|> that ends it."""
    ends = [
        keep and (i + 1 == len(trained) or not trained[i + 1]) for i, keep in enumerate(trained)
    ]
    return [keep and not end for keep, end in zip(trained, ends, strict=True)]


def test_the_tolerance_catches_common_mistakes(demo_model_dir: Path) -> None:
    """A recipe with one of these mistakes would log what the matching variant of the
    reference computes; each lands several tolerances away from the right losses. (Summing
    instead of averaging the workers' losses is not among them: Adam does not see scale.)"""
    rows = _rows()
    right = [loss for loss, _ in reference_losses(demo_model_dir, rows)]
    mistakes: dict[str, dict[str, Any]] = {
        "one token-weighted mean over all workers' rows": {
            "combine": lambda per_worker: (
                sum(s for s, _ in per_worker) / sum(c for _, c in per_worker)
            )
        },
        "the schedule one step ahead": {"lr_at": lambda step, total: cosine_lr(step + 1, total)},
        "a constant lr": {"lr_at": lambda step, total: LR},
        "the prompt trained too": {"trained_tokens": lambda trained: [True] * len(trained)},
        "the <|eot_id|> not trained": {"trained_tokens": _without_eot},
    }
    for mistake, swapped in mistakes.items():
        wrong = [loss for loss, _ in reference_losses(demo_model_dir, rows, **swapped)]
        gap = max(abs(a - b) for a, b in zip(wrong, right, strict=True))
        assert gap > 4 * TOLERANCE, (mistake, gap)
