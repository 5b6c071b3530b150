"""Base models: the `tiny` model built from scratch, hub / local models, QLoRA quantisation, dtypes.

Everything here imports torch lazily; callers are commands that already decided to run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.errors import ModelError
from sqltune.generation import Precision

log = logs.get("modeling")

TINY = "tiny"
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def choose_method(requested: str, model_name: str) -> tuple[str, str]:
    """Resolve `auto` to a training method, with the reason."""
    if requested != "auto":
        return requested, f"{requested} requested"
    if model_name == TINY:
        return "full", "the tiny model starts from random weights, so every weight must train"
    import torch

    if torch.cuda.is_available() and _has_bitsandbytes():
        return "qlora", "CUDA and bitsandbytes are available: 4-bit NF4 base + LoRA fits the smallest GPU"
    return "lora", "no CUDA or no bitsandbytes: LoRA on a full-precision base"


def default_learning_rate(method: str, model_name: str) -> float:
    """Peak LR when the config leaves it at 0: random weights need a large step, adapters a middling
    one, and a full fine-tune of pretrained weights a small one (larger ones wreck what it knows)."""
    if model_name == TINY and method == "full":
        return 3e-3
    return 2e-4 if method in ("lora", "qlora") else 2e-5


def weight_precision(compute: Precision, method: str) -> Precision:
    """The dtype the base's weights are loaded in for training with `compute`. A full fine-tune on a CPU keeps
    fp32 master weights under bf16 autocast (AdamW updates in bf16 lose most of their bits); LoRA's frozen
    base is stored in the compute dtype itself (half the memory, no cast per step; the adapters stay fp32)."""
    if compute.device == "cpu" and compute.name != "fp32" and method == "full":
        return Precision("fp32", "cpu", f"full fine-tune: fp32 master weights, {compute.name} autocast")
    return compute


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on the training texts (any byte can be encoded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **SPECIAL_TOKENS)


def build_tiny(texts: Iterable[str], *, layers: int = 4, vocab_size: int = 2048, seed: int = 0,
               max_positions: int = 1024) -> tuple[Any, Any]:
    """A small Llama-architecture model (hidden 128, head_dim 64) from scratch, and its tokenizer."""
    tokenizer = train_tokenizer(texts, vocab_size)
    return build_tiny_model(tokenizer, layers=layers, seed=seed, max_positions=max_positions), tokenizer


def build_tiny_model(tokenizer: Any, *, layers: int = 4, seed: int = 0, max_positions: int = 1024) -> Any:
    """The tiny model for a given tokenizer; the same (tokenizer, layers, seed) give the same weights,
    so a resumed LoRA job on a fresh machine rebuilds the exact base it started from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def hf_token() -> str | None:
    """HF_TOKEN, read where used and never stored."""
    return os.environ.get("HF_TOKEN") or None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, token=hf_token(), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of `{name}`: {e}",
                         "check the model id or folder; gated models need HF_TOKEN; use --model tiny offline") from None
    if tok.pad_token is None:
        # a pad distinct from EOS where possible: padding must never mask the EOS the model learns
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def load_base(name: str, precision: Precision, *, quantize_4bit: bool = False, trust_remote_code: bool = False,
              device_map: Any = None) -> Any:
    """A pretrained causal LM from the hub or a folder, optionally 4-bit NF4 (QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": precision.torch_dtype, "token": hf_token(),
                              "trust_remote_code": trust_remote_code}
    if quantize_4bit:
        if not _has_bitsandbytes():
            raise ModelError("method qlora needs bitsandbytes, which is not installed",
                             "pip install 'sqltune[qlora]', or use --method lora")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.torch_dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model `{name}`: {e}",
                         "check the model id or folder; gated models need HF_TOKEN; use --model tiny offline") from None


def is_local_model(name: str) -> bool:
    return Path(name).is_dir()


def resolve_source(name: str) -> tuple[str, dict[str, Any]]:
    """What `from_pretrained` loads for `--model`, and where it came from (recorded in sqltune.json).

    A hub id or a local folder is used as it is; an embedded model (`smollm2-135m`, `gemma3-270m`) or a
    local `.gguf` file is converted once into the model cache and the converted folder is returned.
    """
    from sqltune.models import gguf

    if not gguf.is_gguf_source(name):
        return name, {"source": name, "kind": "local" if is_local_model(name) else "hub"}
    from sqltune.artifacts import storage

    folder, info = gguf.resolve(name, storage.cache_root())
    return str(folder), {"source": name, "kind": "gguf", "gguf": info["gguf"], "sha256": info["sha256"],
                         "converted_folder": str(folder), "conversion_s": info["seconds"]}
