"""Loading a finished sqltune model folder for generation, and the compute precision: what the
transformers engine (sqltune.engines.transformers_engine), the vLLM engine's dtype and the training
job share. The generation loop itself lives in the engines; batch callers (eval, ask, the job's
held-out check, benchmarks) drive it through sqltune.engines.batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune import prompts
from sqltune.artifacts import manifests, registry


@dataclass(frozen=True)
class Precision:
    """The compute dtype and why it was chosen (logged at start-up)."""

    name: str  # "bf16" | "fp16" | "fp32"
    device: str  # "cuda" | "cpu"
    reason: str

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_support(cpuinfo: str | None = None, capability: str | None = None) -> str | None:
    """The CPU feature that makes bf16 matmuls native (AMX-BF16 or AVX512-BF16), or None.

    Read from /proc/cpuinfo's flags, else from torch's CPU capability (which names AMX where oneDNN
    uses it); `cpuinfo` / `capability` are for tests."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    for flag in _CPU_BF16_FLAGS:
        if flag in flags:
            return flag
    if capability is None:
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability())
    return capability if ("AMX" in capability.upper() or "BF16" in capability.upper()) else None


def choose_precision(requested: str = "auto", *, training: bool = False) -> Precision:
    """The compute dtype for `requested`. On a CPU `auto` is fp32, except for training on a CPU with native
    bf16 (AMX-BF16 / AVX512-BF16): bf16 compute there, 1.5x per step on the demo recipe; the job still
    merges and publishes in fp32, so serving and evaluation (which ask without `training`) stay fp32."""
    import torch

    if not torch.cuda.is_available():
        if requested == "auto" and training and (feature := cpu_bf16_support()):
            return Precision("bf16", "cpu", f"CPU has {feature}: bf16 matmuls are native, so training computes in "
                             "bf16 (the model is merged and published in fp32)")
        if requested in ("auto", "fp32"):
            why = "no CUDA device and no native bf16 on this CPU" if training else "no CUDA device"
            return Precision("fp32", "cpu", f"{why}: fp32, since bf16/fp16 matmuls are emulated and slow there")
        return Precision(requested, "cpu", f"{requested} requested on CPU")
    name = torch.cuda.get_device_name(0)
    if requested != "auto":
        return Precision(requested, "cuda", f"{requested} requested on {name}")
    if torch.cuda.is_bf16_supported():
        return Precision("bf16", "cuda", f"{name} supports bf16: same range as fp32, no loss scaling needed")
    return Precision("fp16", "cuda", f"{name} has no bf16: fp16 with loss scaling")


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: prompts.PromptTemplate
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    _compiler: Any = field(default=None, repr=False)

    @property
    def compiler(self) -> Any:
        """The grammar compiler for this model's tokenizer and vocabulary (built on first use)."""
        if self._compiler is None:
            from sqltune import constrain

            eos = self.model.generation_config.eos_token_id
            eos = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
            self._compiler = constrain.Compiler(self.tokenizer, self.model.get_output_embeddings().weight.shape[0],
                                                [e for e in eos if e is not None])
        return self._compiler

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def load(model: str | Path, device: str = "auto", dtype: str = "auto") -> Loaded:
    """Load a finished model (local folder or bucket URL), checking its manifest and template."""
    return from_folder(registry.resolve_model(str(model)), choose_precision(dtype), device)


def from_folder(path: Path, precision: Any, device: str = "auto") -> Loaded:
    """Load a model folder as it is (no manifest check: the exporter uses it before the manifest exists)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = prompts.load_template(path)
    device = precision.device if device == "auto" else device
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded so every row continues its own prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    net = AutoModelForCausalLM.from_pretrained(path, dtype=precision.torch_dtype).to(device)
    net.eval()
    return Loaded(net, tokenizer, template, Path(path), manifests.read_meta(path))


def encode_batch(tokenizer: Any, prompts_: Sequence[str]) -> Any:
    """The prompts' ids as trained (prompts.encode_prompt), left-padded into one batch."""
    return tokenizer.pad([{"input_ids": prompts.encode_prompt(tokenizer, p)} for p in prompts_], padding=True,
                         return_tensors="pt")
