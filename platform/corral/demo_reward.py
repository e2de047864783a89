"""A small reward model built on disk beside the demo LLM, whose scores mean something.

`build_demo_reward_model` samples replies from the demo policy itself (so the reward model
sees exactly what the policy writes), mixes in replies drawn from letter and non-letter
tokens in every proportion (so it also judges replies the policy only writes after
training), and regresses a `LlamaForSequenceClassification` (one label) on
`letter_share`, the rule below, for each [user prompt, assistant reply] rendered with the
demo's chat template. The score of a reply therefore approximates its letter share: a
number in [0, 1] that a test can compare against the rule, and that DPO on the demo
policy can move (the policy's random weights write about as many byte and punctuation
tokens as word pieces; preferring the wordier of its replies teaches it words).

Measured on the default spec (2 shared cores, under load): a build takes 10-12 s, all on
one thread; on held-out policy replies the scores' Spearman correlation with the rule is
0.53 (their letter shares spread little: 0.79 +- 0.06) with a mean error of 0.056, and
0.85 on replies spread over [0, 1]. One round of best-vs-worst DPO on the policy's own
replies raises its mean score by 0.14-0.17 (tests/sdg_loop.py has the settings).

Like `build_demo_model`: seeded and deterministic (the same policy and spec give the same
bytes), kept when already built (a marker file), built in a staging directory and moved
into place only once it loads back through `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import string
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F  # noqa: N812  # torch's own convention
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from corral.demo_model import (
    _MODEL_FILES,
    MARKER_FILE,
    _existing_state,
    _install,
    _quiet_progress_bars,
)

# Bump when the recipe (prompts, sampling, training) changes: built models then rebuild.
_MARKER_FORMAT: Final = 1
# The tokenizer files come from the policy; the reward model adds no generation config.
_REWARD_FILES: Final = tuple(name for name in _MODEL_FILES if name != "generation_config.json")
_TOKENIZER_FILES: Final = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_LETTERS: Final = frozenset(string.ascii_letters)

# The prompts the reward model is trained with (held-out prompts of tests differ).
TRAINING_PROMPTS: Final = (
    "What is Corral?",
    "What does Corral do?",
    "Where is the job state kept?",
    "What is the capital of France?",
    "How many days are in a week?",
    "What color is the sky?",
    "Can you help me write a poem?",
    "What is two plus three?",
    "Where should I start?",
    "Why is the grass green?",
    "Please summarize the story.",
    "Translate hello into Spanish.",
    "How do I sort a list in Python?",
    "What does a model learn?",
    "Tell me a fun fact.",
    "Thank you for your help!",
)


def letter_share(reply: str) -> float:
    """The rule the demo reward model learns: the share of the reply's non-whitespace
    characters that are ASCII letters (0.0 for a reply with none). "Paris is big." scores
    10/11; "%% 12 !?" scores 0."""
    visible = [character for character in reply if not character.isspace()]
    if not visible:
        return 0.0
    return sum(character in _LETTERS for character in visible) / len(visible)


@dataclass(frozen=True)
class DemoRewardSpec:
    """How the reward model is made; equal specs (and policies) build identical models."""

    # Smaller than the policy: it only has to average over the reply, and it trains in
    # seconds on a shared CPU (measured: 2 layers of 64 learn no better in the same time).
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    policy_samples_per_prompt: int = 16  # replies sampled from the policy at temperature 1
    mixed_samples: int = 384  # replies drawn from letter and other tokens, any proportion
    max_reply_tokens: int = 24
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-2
    seed: int = 0


def build_demo_reward_model(
    directory: Path, *, policy_dir: Path, spec: DemoRewardSpec = DemoRewardSpec()
) -> Path:
    """Build (or keep) the demo reward model for the demo policy in `policy_dir`.

    Same contract as `build_demo_model`: a directory holding this very model is left
    alone, one holding another demo model is rebuilt, a non-empty directory without our
    marker is refused with ValueError, and a failed build leaves nothing behind.
    """
    directory, policy_dir = Path(directory), Path(policy_dir)
    marker = {
        "format": _MARKER_FORMAT,
        "kind": "reward",
        "rule": "letter_share",
        "spec": asdict(spec),
        "policy_sha256": _policy_digest(policy_dir),
    }
    if _existing_state(directory, marker, _REWARD_FILES) == "current":
        return directory

    directory.parent.mkdir(parents=True, exist_ok=True)
    with (
        _quiet_progress_bars(),
        tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.") as tmp,
    ):
        staging = Path(tmp) / "model"
        _train_and_save(staging, policy_dir, spec)
        _verify(staging)
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install(staging, directory, marker, _REWARD_FILES)
    return directory


def build_untrained_reward_model(
    policy_dir: Path,
    destination: Path,
    *,
    labels: Sequence[str] = ("reward",),
    seed: int = 0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
) -> Path:
    """A reward model with seeded random weights in `destination`, one head output per
    label, sharing the demo policy's tokenizer (its chat template and pad token): for
    tests that need a model's shape but not its judgement (parity, multi-attribute
    weights) and for the benchmarks, which ask for a larger one so that batching has
    compute to share. Equal arguments build identical weights."""
    policy = json.loads((policy_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=policy["vocab_size"],
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=policy["max_position_embeddings"],
        bos_token_id=policy["bos_token_id"],
        eos_token_id=policy["eos_token_id"],
        pad_token_id=policy["pad_token_id"],
    )
    # LlamaConfig's signature does not name the head's labels: set them on the config.
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
        # A freshly made head is near zero; widen it so scores differ visibly.
        torch.nn.init.normal_(model.score.weight, std=1.0)
    destination.mkdir(parents=True)
    model.save_pretrained(destination, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        shutil.copy(policy_dir / name, destination / name)
    return destination


def reward_dir_beside(policy_dir: Path) -> Path:
    """Where `corral models create-demo` puts the reward model of a demo model: beside it,
    named after it (`models/demo` -> `models/demo-reward`, as the embedded default has)."""
    policy_dir = Path(policy_dir)
    return policy_dir.with_name(f"{policy_dir.name}-reward")


def load_demo_reward_model(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a reward model directory through `from_pretrained`, from local files only."""
    model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


@torch.no_grad()
def score_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, str]]],
) -> list[float]:
    """The reward of each conversation (its last message the reply judged), rendered with
    the chat template as the reward Serve app renders it."""
    batch = _encode(tokenizer, conversations)
    scores: list[float] = model(**batch).logits[:, 0].tolist()
    return scores


def _policy_digest(policy_dir: Path) -> str:
    """What the reward model depends on in the policy: its weights and tokenizer files."""
    names = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")
    missing = [name for name in names if not (policy_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{policy_dir} is not a demo model: no {', '.join(missing)}")
    digest = hashlib.sha256()
    for name in names:
        digest.update(hashlib.sha256((policy_dir / name).read_bytes()).digest())
    return digest.hexdigest()


def _encode(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[dict[str, str]]]
) -> dict[str, torch.Tensor]:
    """Render each conversation with the chat template (it brings its own BOS) and pad on
    the right, where the classifier looks for each row's last real token."""
    texts = [
        tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
        for messages in conversations
    ]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _training_replies(
    policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: DemoRewardSpec
) -> list[tuple[str, str]]:
    """(prompt, reply) pairs: the policy's own samples, then token mixtures."""
    stop_ids = set(policy.generation_config.eos_token_id or [])
    prompts = [p for p in TRAINING_PROMPTS for _ in range(spec.policy_samples_per_prompt)]
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        for prompt in prompts
    ]
    tokenizer.padding_side = "left"  # generate appends after each row's last prompt token
    inputs = tokenizer(rendered, add_special_tokens=False, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    generated = policy.generate(  # type: ignore[operator]  # transformers' stubs
        **inputs,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=spec.max_reply_tokens,
    )[:, inputs["input_ids"].shape[1] :]
    pairs: list[tuple[str, str]] = []
    for prompt, row in zip(prompts, generated.tolist(), strict=True):
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        pairs.append((prompt, _decode(tokenizer, row[:cut])))

    vocabulary = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids) | set(stop_ids)
    words: list[int] = []
    others: list[int] = []
    for token_id in sorted(vocabulary.values()):
        if token_id in special:
            continue
        text = _decode(tokenizer, [token_id]).strip()
        (words if text and set(text) <= _LETTERS else others).append(token_id)
    word_ids, other_ids = torch.tensor(words), torch.tensor(others)
    for index in range(spec.mixed_samples):
        length = int(torch.randint(1, spec.max_reply_tokens + 1, ()).item())
        share = torch.rand(())
        from_words = torch.rand(length) < share
        ids = torch.where(
            from_words,
            word_ids[torch.randint(len(word_ids), (length,))],
            other_ids[torch.randint(len(other_ids), (length,))],
        )
        prompt = TRAINING_PROMPTS[index % len(TRAINING_PROMPTS)]
        pairs.append((prompt, _decode(tokenizer, ids.tolist())))
    return pairs


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Text as the serving engine returns it: special tokens kept, spaces left alone."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert isinstance(text, str)
    return text


def _train_and_save(directory: Path, policy_dir: Path, spec: DemoRewardSpec) -> None:
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, local_files_only=True)
    policy_config = policy.config
    config = LlamaConfig(
        vocab_size=policy_config.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=policy_config.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=policy_config.bos_token_id,
        eos_token_id=policy_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.num_labels = 1  # one score; LlamaConfig's signature does not name it
    # fork_rng: the seed decides samples and weights without disturbing the caller's RNG.
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        pairs = _training_replies(policy, tokenizer, spec)
        model = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
        _fit(model, tokenizer, pairs, spec)
    directory.mkdir(parents=True)
    model.save_pretrained(directory, safe_serialization=True)
    for name in _TOKENIZER_FILES:  # the policy's own files: one tokenizer, one template
        shutil.copyfile(policy_dir / name, directory / name)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: the sums then come out in one order (the same bytes on any
    machine), and a model this small trains faster alone than fighting for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    spec: DemoRewardSpec,
) -> None:
    """Regress the score on `letter_share` with AdamW over shuffled batches."""
    conversations = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        for prompt, reply in pairs
    ]
    targets = torch.tensor([letter_share(reply) for _, reply in pairs])
    encoded = _encode(tokenizer, conversations)  # once: rendering costs more than a step
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / spec.steps)
    model.train()
    order = torch.randperm(len(pairs))
    cursor = 0
    for _ in range(spec.steps):
        if cursor + spec.batch_size > len(order):
            order, cursor = torch.randperm(len(pairs)), 0
        chosen = order[cursor : cursor + spec.batch_size].tolist()
        cursor += spec.batch_size
        batch = {name: tensor[chosen] for name, tensor in encoded.items()}
        loss = F.mse_loss(model(**batch).logits[:, 0], targets[chosen])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
    model.train(False)


_CHECK_CONVERSATION: Final = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
)


def _verify(directory: Path) -> None:
    """Load the saved model the real way and raise RuntimeError if anything is off (how
    well it learned the rule is for tests/test_demo_reward.py to judge)."""
    model, tokenizer = load_demo_reward_model(directory)
    if model.config.num_labels != 1 or model.config.pad_token_id != tokenizer.pad_token_id:
        raise RuntimeError("the reward model needs one label and the tokenizer's pad id")
    (reward,) = score_replies(model, tokenizer, [[dict(m) for m in _CHECK_CONVERSATION]])
    if not math.isfinite(reward):
        raise RuntimeError(f"the reward model scores a plain answer {reward}")
