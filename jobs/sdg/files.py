"""A generation job's directory in storage (corral.storage): a directory every node sees
(its `output_dir`) or object storage (its `output_uri`). It holds

- `batches/`: one shard per finished batch (jobs/sdg/dataset.py), each written whole
  (Storage.write_bytes), so a shard that is there is complete and a resumed attempt
  skips its prompts;
- `data.jsonl` and `statistics.json`: the dataset and its run's figures, at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from corral.storage import Storage
from jobs.sdg.config import SyntheticDataJobConfig
from jobs.sdg.dataset import (
    SHARD_SUFFIX,
    SHARDS_DIR,
    Outcome,
    SavedOutcome,
    decode_shard,
    encode_shard,
    shard_name,
)

DATA_FILE = "data.jsonl"
STATISTICS_FILE = "statistics.json"
# A shard is one batch of prompts with their candidates' texts; far below this.
SHARD_LIMIT = 1 << 30


class JobFiles:
    def __init__(self, config: SyntheticDataJobConfig) -> None:
        root = config.output_uri if config.output_uri is not None else str(config.output_dir)
        self._storage = Storage(root, options=config.storage)

    def uri(self, *parts: str) -> str:
        return self._storage.root.child(*parts).uri

    def saved_outcomes(self) -> dict[int, SavedOutcome]:
        """Every prompt an earlier attempt finished, by its index."""
        done: dict[int, SavedOutcome] = {}
        for name in self._storage.file_names(self.uri(SHARDS_DIR)):
            if name.endswith(SHARD_SUFFIX):
                data = self._storage.read_bytes(self.uri(SHARDS_DIR, name), limit=SHARD_LIMIT)
                for outcome in decode_shard(data):
                    done.setdefault(outcome.index, outcome)
        return done

    def save_batch(self, outcomes: Sequence[Outcome]) -> str:
        """Write one finished batch as its own shard; returns its name."""
        name = shard_name(outcomes)
        self._storage.write_bytes(self.uri(SHARDS_DIR, name), encode_shard(outcomes))
        return name

    def write(self, name: str, data: bytes) -> str:
        """Write a file of the job's directory whole; returns its sha256."""
        self._storage.write_bytes(self.uri(name), data)
        return hashlib.sha256(data).hexdigest()

    def url(self, name: str) -> str:
        """The URL clients (and the datasets API) read the file at: `file://` on a
        directory, a presigned `https://` one on S3 (corral.storage)."""
        return self._storage.file_url(self.uri(name))
