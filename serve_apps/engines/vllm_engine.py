"""The vLLM generation engine: vLLM's async engine (V1 `AsyncLLM`) behind
`AsyncGenerationEngine`. vLLM schedules requests itself (continuous batching: a request
joins the running batch at the next step and leaves it when it stops), so each request
is submitted as it arrives and streams its own tokens.

It runs only in the vLLM environment that scripts/setup-vllm.sh builds (a replica's
`py_executable`, see serve_apps.vllm_env); nothing else imports this module.

Numbers and edges are the transformers engine's (serve_apps.engines.transformers_engine):
- stop tokens: Llama 3's <|eot_id|> ends the turn, <|eom_id|> the message, any other
  end-of-sequence id the turn; running out of `max_tokens` or context is OUT_OF_TOKENS.
  The stop token is in `token_ids`, never in the text.
- `max_tokens <= 0` means "as many as the context window leaves"; the stop token counts.
- `logprobs` are the chosen token's log-probability under the raw distribution (before
  temperature, top-k and top-p): vLLM's `logprobs_mode="raw_logprobs"`, its default, set
  here explicitly.
- the same bad requests are refused, with the same messages, before any work.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from serve_apps.adapters import AdapterSlots, AdapterSlotsBusy
from serve_apps.engines.protocol import (
    AdapterRef,
    GenerationRequest,
    GenerationResult,
    StopReason,
    TokenDelta,
)

# Its error class too: the caller's process (no vLLM there) must be able to unpickle it.
from serve_apps.engines.transformers_engine import (
    InvalidRequestError,
    _check_sampling,
    check_prompt_fits,
    resolve_placement,
    stop_token_reasons,
)


@dataclass(frozen=True)
class VLLMEngineConfig:
    model_dir: Path
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or float32 | bfloat16 | float16
    tensor_parallel_size: int = 1  # a replica's GPUs (1 on CPU)
    max_context: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0  # seeds requests that bring no seed of their own
    max_num_seqs: int = 64  # the most requests vLLM runs in one batch
    gpu_memory_utilization: float = 0.9
    # The KV cache's size on CPU (on GPU: what gpu_memory_utilization leaves). Without
    # it vLLM reserves gpu_memory_utilization of the machine's whole memory.
    cpu_kv_cache_bytes: int = 1 << 30
    # LoRA adapters over this model (serve_apps.adapters): how many stay loaded, how many
    # of them one tenant's, the highest rank; 0 adapters: LoRA off.
    max_adapters: int = 0
    adapters_per_tenant: int = 1
    max_adapter_rank: int = 16
    # How long a request waits for an adapter slot while every candidate is busy.
    adapter_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be at least 2")


class VLLMEngine:
    """Generates with vLLM's AsyncLLM over a local model directory, and with any of the
    LoRA adapters registered over it (loaded on first use, `AdapterSlots` deciding which
    stay loaded)."""

    def __init__(
        self, config: VLLMEngineConfig, *, local_adapter: Callable[[str], Path] | None = None
    ) -> None:
        """`local_adapter`: an adapter's local directory from its path or storage URI
        (downloading it; blocking). Default: the path as a directory."""
        self.config = config
        self._local_adapter = local_adapter or Path
        device, dtype = resolve_placement(config.device, config.dtype)
        if device == "cpu" and config.tensor_parallel_size != 1:
            raise ValueError("tensor parallelism needs GPUs: tensor_parallel_size must be 1 on CPU")
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            config.model_dir, local_files_only=True
        )
        args = AsyncEngineArgs(
            model=str(config.model_dir),
            tokenizer=str(config.model_dir),
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=config.max_context,
            tensor_parallel_size=config.tensor_parallel_size,
            # Several GPUs of one replica: vLLM's Ray workers fill the replica's placement
            # group (serve_apps.deployment keeps its bundles on one node).
            distributed_executor_backend="ray" if config.tensor_parallel_size > 1 else None,
            seed=config.seed,
            max_num_seqs=config.max_num_seqs,
            gpu_memory_utilization=config.gpu_memory_utilization,
            logprobs_mode="raw_logprobs",
            max_logprobs=1,
            # CUDA graphs / torch.compile cost minutes at start-up on CPU for no gain on a
            # small model; on GPU they pay off.
            enforce_eager=device == "cpu",
            disable_log_stats=True,
            enable_prefix_caching=device != "cpu",
            kv_cache_memory_bytes=config.cpu_kv_cache_bytes if device == "cpu" else None,
            # Corral decides which adapters stay loaded (AdapterSlots, fair between
            # tenants) and unloads one before loading another, so vLLM's own LRU cache
            # (max_cpu_loras) never evicts; max_loras: how many one batch may mix.
            enable_lora=config.max_adapters > 0,
            max_loras=max(1, config.max_adapters),
            max_cpu_loras=max(1, config.max_adapters),
            max_lora_rank=config.max_adapter_rank,
        )
        self._engine = AsyncLLM.from_engine_args(args)
        model_config = self._engine.model_config
        self.context_window: int = int(model_config.max_model_len)
        eos = model_config.hf_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        generation_eos = _generation_eos(config.model_dir)
        self._stop_reasons = stop_token_reasons(
            self._tokenizer, [i for i in [*eos_ids, *generation_eos] if isinstance(i, int)]
        )
        self._seed_source = random.Random(config.seed)  # noqa: S311  # seeds, not secrets
        self._aborted = 0
        self._slots = (
            AdapterSlots(capacity=config.max_adapters, per_tenant=config.adapters_per_tenant)
            if config.max_adapters > 0
            else None
        )
        self._slots_changed = asyncio.Condition()
        # Adapter id -> its LoRARequest once loaded (or the load under way).
        self._loras: dict[str, asyncio.Future[LoRARequest]] = {}
        self._adapter_loads: list[float] = []  # seconds per load, for stats

    # --- TokenCounter ---------------------------------------------------------------

    def count_tokens(self, prompt: str) -> int:
        return len(self._encode(prompt))

    # --- AsyncGenerationEngine -------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        self._checked_prompt_ids(request)

    def _check_adapter(self, request: GenerationRequest) -> None:
        if request.adapter is not None and self._slots is None:
            raise InvalidRequestError(
                "this model serves no adapters (its max_adapters is 0); register the "
                "adapter over a base that does, or with engine transformers"
            )

    async def generate_one(self, request: GenerationRequest) -> GenerationResult:
        result: GenerationResult | None = None
        async for item in self.stream_one(request):
            if isinstance(item, GenerationResult):
                result = item
        assert result is not None
        return result

    async def stream_one(
        self, request: GenerationRequest
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        prompt_ids = self._checked_prompt_ids(request)
        params = self._sampling_params(request, len(prompt_ids))
        request_id = uuid.uuid4().hex
        adapter = request.adapter
        lora = await self._acquire(adapter) if adapter is not None else None
        token_ids: list[int] = []
        logprobs: list[float] = []
        text = ""
        finished = False
        try:
            async for output in self._engine.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id, lora_request=lora
            ):
                completion = output.outputs[0]
                new_ids = list(completion.token_ids)
                new_logprobs = _chosen_logprobs(completion.logprobs, new_ids)
                # One step may bring several tokens (or none); the delta text comes with
                # the last of them.
                for index, token_id in enumerate(new_ids):
                    last = index == len(new_ids) - 1
                    delta = completion.text if last else ""
                    token_ids.append(token_id)
                    text += delta
                    logprob = new_logprobs[index] if new_logprobs is not None else None
                    if logprob is not None:
                        logprobs.append(logprob)
                    yield TokenDelta(
                        text=delta,
                        token_id=token_id,
                        logprob=logprob if request.sampling.logprobs else None,
                    )
                if output.finished:
                    finished = True
                    yield GenerationResult(
                        text=text,
                        token_ids=tuple(token_ids),
                        stop_reason=self._stop_reasons.get(
                            token_ids[-1] if token_ids else -1, StopReason.OUT_OF_TOKENS
                        ),
                        prompt_tokens=len(prompt_ids),
                        logprobs=tuple(logprobs) if request.sampling.logprobs else None,
                    )
        finally:
            if not finished:
                # Closed early (the caller left): free its slot in the running batch now.
                self._aborted += 1
                await self._engine.abort(request_id)
            if adapter is not None:
                await self._release(adapter)

    # --- adapters ---------------------------------------------------------------------

    async def _acquire(self, adapter: AdapterRef) -> LoRARequest:
        """The adapter's LoRARequest, loaded (unloading what AdapterSlots says first),
        counted in flight until `_release`. Waits while every slot it may take is busy:
        AdapterSlotsBusy after `adapter_wait_s`."""
        assert self._slots is not None  # check refused adapters otherwise
        slots = self._slots
        deadline = time.monotonic() + self.config.adapter_wait_s
        async with self._slots_changed:
            while (admission := slots.admit(adapter.adapter_id, adapter.tenant)) is None:
                left = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(self._slots_changed.wait(), timeout=max(left, 0))
                except TimeoutError:
                    raise AdapterSlotsBusy(
                        f"every adapter slot of this replica ({slots.capacity}) stayed busy "
                        f"for {self.config.adapter_wait_s:g} s"
                    ) from None
            if admission.load:
                for slot in admission.evict:
                    self._forget_slot(slot)
                loading: asyncio.Future[LoRARequest] = asyncio.get_running_loop().create_future()
                self._loras[adapter.adapter_id] = loading
            else:
                loading = self._loras[adapter.adapter_id]
        if not admission.load:
            try:
                return await asyncio.shield(loading)
            except BaseException:
                await self._release(adapter)
                raise
        try:
            for slot in admission.evict:
                await self._engine.remove_lora(slot)
            started = time.monotonic()
            path = await asyncio.to_thread(self._local_adapter, adapter.path)
            lora = LoRARequest(
                lora_name=adapter.adapter_id, lora_int_id=admission.slot, lora_path=str(path)
            )
            await self._engine.add_lora(lora)
            self._adapter_loads.append(time.monotonic() - started)
        except BaseException as exc:
            async with self._slots_changed:
                slots.discard(adapter.adapter_id)
                self._loras.pop(adapter.adapter_id, None)
                self._slots_changed.notify_all()
            loading.set_exception(exc)
            loading.exception()  # retrieved: waiters get it, nobody else needs to
            raise
        loading.set_result(lora)
        return lora

    async def _release(self, adapter: AdapterRef) -> None:
        assert self._slots is not None
        async with self._slots_changed:
            self._slots.release(adapter.adapter_id)
            self._slots_changed.notify_all()

    def _forget_slot(self, slot: int) -> None:
        for adapter_id, loaded in list(self._loras.items()):
            if loaded.done() and not loaded.exception() and loaded.result().lora_int_id == slot:
                del self._loras[adapter_id]

    # --- what a replica reports -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Requests vLLM holds now, and how many streams were aborted early."""
        processor = self._engine.output_processor
        stats: dict[str, Any] = {
            "unfinished_requests": processor.get_num_unfinished_requests(),
            "aborted_requests": self._aborted,
        }
        if self._slots is not None:
            stats["adapters"] = self._slots.resident()  # adapter id -> tenant
            stats["adapter_load_s"] = list(self._adapter_loads[-100:])
        return stats

    def shutdown(self) -> None:
        self._engine.shutdown()

    # --- helpers ----------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(prompt, add_special_tokens=False)
        return ids

    def _checked_prompt_ids(self, request: GenerationRequest) -> list[int]:
        _check_sampling(request.sampling)
        self._check_adapter(request)
        prompt_ids = self._encode(request.prompt)
        check_prompt_fits(prompt_ids, self.context_window)
        return prompt_ids

    def _sampling_params(self, request: GenerationRequest, prompt_tokens: int) -> SamplingParams:
        sampling = request.sampling
        room = self.context_window - prompt_tokens
        budget = room if sampling.max_tokens <= 0 else min(sampling.max_tokens, room)
        seed = sampling.seed
        if seed is None:
            seed = self._seed_source.getrandbits(62)
        greedy = sampling.greedy
        return SamplingParams(
            max_tokens=budget,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,
            seed=seed,
            # 0: the chosen token's own logprob only. Asked for always (cheap): it costs
            # one gather per token, and keeps one code path.
            logprobs=0 if sampling.logprobs else None,
            stop_token_ids=sorted(self._stop_reasons),
            ignore_eos=False,
            skip_special_tokens=False,  # <|python_tag|> stays: the tool-call parser needs it
            spaces_between_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
        )


def _chosen_logprobs(logprobs: Any, token_ids: list[int]) -> list[float] | None:
    """The chosen token's logprob per position from vLLM's per-position dicts."""
    if logprobs is None:
        return None
    return [
        float(position[token_id].logprob)
        for position, token_id in zip(logprobs, token_ids, strict=True)
    ]


def _generation_eos(model_dir: Path) -> list[int]:
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        return []
    eos = config.eos_token_id
    if isinstance(eos, int):
        return [eos]
    return [i for i in eos or [] if isinstance(i, int)]
