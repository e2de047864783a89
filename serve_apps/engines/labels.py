"""How a reward head's labels make one score, in plain Python: the engine applies it to
the logits, and the control plane checks a registration's weights against a checkpoint's
config.json with it, without loading the model."""

from __future__ import annotations

from collections.abc import Mapping


def label_weights(id2label: Mapping[int, str], weights: Mapping[str, float] | None) -> list[float]:
    """The weight of each label in head order, from `weights` by label name: a single
    label without weights counts once; ValueError for weights naming a label the head
    lacks, or for several labels and no weights."""
    labels = [id2label[index] for index in sorted(id2label)]
    if weights is None:
        if len(labels) != 1:
            raise ValueError(
                f"the reward head has {len(labels)} labels ({', '.join(labels)}): give "
                "score_weights to say how they make one score"
            )
        return [1.0]
    unknown = sorted(set(weights) - set(labels))
    if unknown:
        raise ValueError(
            f"score_weights names labels the reward head lacks: {', '.join(unknown)} "
            f"(its labels: {', '.join(labels)})"
        )
    return [float(weights.get(label, 0.0)) for label in labels]


def config_labels(config: Mapping[str, object]) -> dict[int, str]:
    """A checkpoint's label names by head index, from its config.json as JSON: its
    `id2label`, else transformers' own defaults (`num_labels`, 2 when absent: LABEL_0...)."""
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return {int(index): str(label) for index, label in id2label.items()}
    count = config.get("num_labels", 2)
    return {index: f"LABEL_{index}" for index in range(count if isinstance(count, int) else 2)}
