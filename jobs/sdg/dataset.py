"""What a generation job keeps of its run: one shard per finished batch (so a resumed
attempt knows which prompts are done) and, at the end, the dataset rows in the columns
the fine-tuning recipes take. Pure Python (no Ray, no torch), so it is tested alone.

Rows, per prompt, from its scored candidates (`DatasetOutput` in jobs/sdg/config.py):
- `best` is the highest-scored kept candidate (equal scores: the earlier one), as the
  filters rank them.
- sft: `{"dialog": [prompt messages..., {"role": "assistant", "content": best}]}`.
- dpo: `{"prompt": [prompt messages...], "chosen": best, "rejected": worst}`, `worst` the
  lowest-scored candidate of the prompt, kept or not (equal scores: the later one). No
  row when the scores differ by `min_margin` or less (so ties never give one) or the two
  texts are the same.
A prompt with no kept candidate gives no row, and every row is checked with the recipes'
own rules (jobs/rows.py) and dropped, counted, when they would refuse it (an empty
reply, a prompt that does not end with the user's turn), so the dataset trains as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jobs.rows import PREFERENCE_COLUMNS, SFT_COLUMNS, preference_row_problem, sft_row_problem
from jobs.sdg.config import DatasetOutput, PromptInput

Row = dict[str, Any]
SHARDS_DIR = "batches"
SHARD_SUFFIX = ".jsonl"
# Dataset column -> its type, as the datasets API declares them (the recipes' columns).
COLUMNS: dict[str, dict[str, str]] = {"sft": SFT_COLUMNS, "dpo": PREFERENCE_COLUMNS}


class Candidate(Protocol):
    """One scored generation, as the pipeline gives it (jobs/sdg/pipeline.py)."""

    @property
    def text(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def kept(self) -> bool: ...
    @property
    def stop_reason(self) -> str | None: ...


class Outcome(Protocol):
    """One prompt's scored candidates, in generation order."""

    @property
    def index(self) -> int: ...
    @property
    def candidates(self) -> Sequence[Candidate]: ...


@dataclass(frozen=True)
class SavedCandidate:
    text: str
    score: float
    kept: bool
    stop_reason: str | None = None


@dataclass(frozen=True)
class SavedOutcome:
    """An outcome read back from a shard."""

    index: int
    candidates: tuple[SavedCandidate, ...]


# ---------------------------------------------------------------------- shards


def shard_name(outcomes: Sequence[Outcome]) -> str:
    """`<first>-<last>-<digest>.jsonl` for a batch's prompt indices: readable, and unique
    even for batches whose index ranges interleave."""
    indices = sorted(outcome.index for outcome in outcomes)
    if not indices:
        raise ValueError("a shard holds at least one prompt")
    digest = hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:12]
    return f"{indices[0]}-{indices[-1]}-{digest}{SHARD_SUFFIX}"


def encode_shard(outcomes: Sequence[Outcome]) -> bytes:
    """A batch's outcomes as JSON lines, one prompt a line."""
    lines = [
        json.dumps(
            {
                "index": outcome.index,
                "candidates": [
                    {
                        "text": c.text,
                        "score": c.score,
                        "kept": c.kept,
                        "stop_reason": c.stop_reason,
                    }
                    for c in outcome.candidates
                ],
            },
            ensure_ascii=False,
        )
        for outcome in sorted(outcomes, key=lambda o: o.index)
    ]
    return ("\n".join(lines) + "\n").encode()


def decode_shard(data: bytes) -> list[SavedOutcome]:
    return [_saved(json.loads(line)) for line in data.decode().splitlines() if line.strip()]


def _saved(record: Mapping[str, Any]) -> SavedOutcome:
    return SavedOutcome(
        index=int(record["index"]),
        candidates=tuple(
            SavedCandidate(
                text=str(c["text"]),
                score=float(c["score"]),
                kept=bool(c["kept"]),
                stop_reason=c.get("stop_reason"),
            )
            for c in record["candidates"]
        ),
    )


# ---------------------------------------------------------------------- rows


@dataclass(frozen=True)
class DatasetRows:
    rows: list[Row]
    # Prompts that gave no row, by reason: "no kept candidate", "margin", "refused".
    dropped: dict[str, int]


def dataset_rows(
    outcomes: Iterable[Outcome], prompts: Sequence[PromptInput], output: DatasetOutput
) -> DatasetRows:
    """The dataset's rows in prompt order (see the module docstring)."""
    by_index = {prompt.index: prompt for prompt in prompts}
    rows: list[Row] = []
    dropped = {"no kept candidate": 0, "margin": 0, "refused": 0}
    for outcome in sorted(outcomes, key=lambda o: o.index):
        messages = [turn.model_dump(mode="json") for turn in by_index[outcome.index].messages]
        best = best_kept(outcome.candidates)
        if best is None:
            dropped["no kept candidate"] += 1
            continue
        if output.format == "sft":
            row: Row = {"dialog": [*messages, {"role": "assistant", "content": best.text}]}
            problem = sft_row_problem(row)
        else:
            worst = lowest(outcome.candidates)
            if best.score - worst.score <= output.min_margin or best.text == worst.text:
                dropped["margin"] += 1
                continue
            row = {"prompt": messages, "chosen": best.text, "rejected": worst.text}
            problem = preference_row_problem(row)
        if problem is not None:
            dropped["refused"] += 1
            continue
        rows.append(row)
    return DatasetRows(rows=rows, dropped=dropped)


def best_kept(candidates: Sequence[Candidate]) -> Candidate | None:
    """The highest-scored kept candidate; equal scores: the earlier one."""
    kept = [c for c in candidates if c.kept]
    return max(kept, key=lambda c: c.score) if kept else None  # max keeps the first


def lowest(candidates: Sequence[Candidate]) -> Candidate:
    """The lowest-scored candidate; equal scores: the later one."""
    return min(reversed(candidates), key=lambda c: c.score)  # min keeps the first seen


def encode_rows(rows: Sequence[Row]) -> bytes:
    return ("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n").encode()
