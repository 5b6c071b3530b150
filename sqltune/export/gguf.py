"""A finished sqltune model as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile.

    sqltune export gguf --model models/smollm2-135m-sql --out smollm2-sql.Q8_0.gguf --quant q8_0
    sqltune export gguf --model models/gemma3-270m-sql --out gemma-sql.f16.gguf --quant f16

Architectures: llama (the tiny model, SmolLM2, Llama; q/k rows permuted to llama.cpp's rope layout)
and Gemma 3 / Gemma (every RMSNorm weight + 1, as llama.cpp scales by w where Hugging Face scales by
1 + w; head size from key/value length; tied embeddings, so no output tensor). The weights go through
the `gguf` package: its `TensorNameMap` names every tensor the way llama.cpp expects, its writer lays
out the file and its quantizers make q8_0 (the k-quants of q4_k_m come from sqltune.export.kquants,
checked against gguf's own dequantizers). The tokenizer fields come from sqltune.export.vocab (copied
from the base GGUF, or named by llama.cpp's check hash); the metadata also carries EOS, a chat
template that builds the trained prompt (modelfile.py) and the raw template under `sqltune.*` keys.
The round-trip tests load every export in llama.cpp itself (xllamacpp) and in transformers' reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune import __version__, logs, prompts
from sqltune.artifacts import manifests
from sqltune.errors import ConfigError, ModelError, disk_full
from sqltune.export import modelfile

log = logs.get("export.gguf")

QUANTS = ("f16", "q8_0", "q4_k_m")


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face model_type is written for llama.cpp."""

    gguf_name: str  # the gguf.MODEL_ARCH member
    permute_qk: bool  # q/k rows reordered from rotate-half rope to llama.cpp's interleaved pairs
    norm_shift: float  # added to every RMSNorm weight: Gemma's HF norms scale by (1 + w), llama.cpp's by w
    family: str  # for the error message


# Hugging Face model_type -> how it is written
ARCHITECTURES = {
    "llama": Architecture("LLAMA", True, 0.0, "the tiny model, SmolLM2, Llama"),
    "gemma3_text": Architecture("GEMMA3", False, 1.0, "Gemma 3"),
    "gemma": Architecture("GEMMA", False, 1.0, "Gemma (gemma-2b)"),
}


@dataclass
class GgufResult:
    path: Path
    modelfile: Path | None
    quant: str
    bytes: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)
    architecture: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "modelfile": str(self.modelfile) if self.modelfile else None,
                "quant": self.quant, "bytes": self.bytes, "seconds": self.seconds,
                "tensor_types": self.tensor_types, "architecture": self.architecture}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelError("GGUF export needs the `gguf` package, which is not installed", "pip install gguf") from None
    return gguf


def permute_for_rope(weight: Any, n_head: int) -> Any:
    """Reorder q/k rows from Hugging Face's rotate-half rope layout to llama.cpp's interleaved pairs
    (per head: rows [0..d/2) and [d/2..d) become alternating); transformers undoes it when reading."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def choose_type(gguf: Any, quant: str, tmap_type: Any, shape: tuple[int, ...], layer: int | None, n_layers: int) -> Any:
    """The GGML type of one tensor. 1-D tensors (norms, biases) stay F32 in every mix; rows that a
    block does not divide fall back to the nearest type whose block does (as llama.cpp's quantizer)."""
    Q, T = gguf.GGMLQuantizationType, gguf.MODEL_TENSOR
    if len(shape) == 1:
        return Q.F32
    if quant == "f16":
        return Q.F16
    wanted = Q.Q8_0
    if quant == "q4_k_m":
        # more bits where the error costs most: the output head, and v / ffn_down in the first and last
        # eighths of the layers and every third one between
        more = layer is not None and (layer < n_layers // 8 or layer >= 7 * n_layers // 8
                                      or (layer - n_layers // 8) % 3 == 2)
        if tmap_type == T.OUTPUT or (tmap_type in (T.ATTN_V, T.FFN_DOWN) and more):
            wanted = Q.Q6_K
        else:
            wanted = Q.Q4_K
    fallbacks = {Q.Q4_K: (Q.Q4_K, Q.Q5_0, Q.Q8_0, Q.F16), Q.Q6_K: (Q.Q6_K, Q.Q8_0, Q.F16), Q.Q8_0: (Q.Q8_0, Q.F16)}
    for qtype in fallbacks[wanted]:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block == 0:
            return qtype
    return Q.F16


def _quantize(gguf: Any, array: Any, qtype: Any) -> Any:
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.Q4_K, Q.Q6_K):
        from sqltune.export import kquants

        return kquants.quantize(array, qtype)
    return gguf.quants.quantize(array, qtype)


def _weights(folder: Path) -> Any:
    """(name, float32 numpy array) for every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no .safetensors weights", "point --model at a folder written by `sqltune finetune`")
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, fh.get_tensor(name).float().numpy()


def _rope(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global rope parameters, sliding-window layers' rope parameters or None), across transformers'
    spellings: `rope_parameters` (flat, or per layer type for Gemma 3), `rope_scaling`, `rope_theta`."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    local = None
    if "full_attention" in rope:
        local = rope.get("sliding_attention")
        rope = dict(rope["full_attention"] or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None):
        rope["rope_theta"] = config.rope_theta
    return rope, local


def _architecture_metadata(writer: Any, config: Any, n_layers: int, model_type: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope, local = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ModelError(f"rope scaling {kind} is not exported to GGUF yet",
                         "export a model with plain rope (SmolLM2, the tiny model, Gemma-3-270M)")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if model_type == "llama":
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_vocab_size(int(config.vocab_size))
        if head_dim * config.num_attention_heads != config.hidden_size:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        return
    # Gemma: head size is its own (256), never hidden / heads; llama.cpp reads it from key / value length
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    if model_type == "gemma3_text":
        writer.add_sliding_window(int(config.sliding_window))
        swa_theta = float((local or {}).get("rope_theta") or getattr(config, "rope_local_base_freq", 10000.0))
        if swa_theta != 10000.0:  # llama.cpp's Gemma 3 runs its sliding layers at 10000, the released value
            raise ModelError(f"sliding-window rope base {swa_theta} differs from Gemma 3's 10000",
                             "export a released Gemma 3 configuration")
        types = list(getattr(config, "layer_types", None) or [])
        if types and types != ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]:
            raise ModelError("the layers alternate sliding and full attention other than every sixth layer full",
                             "llama.cpp's gemma3 runs five sliding layers then one full; export a released Gemma 3")
        scalar = float(getattr(config, "query_pre_attn_scalar", head_dim) or head_dim)
        if scalar != head_dim:
            raise ModelError(f"query_pre_attn_scalar {scalar} differs from head_dim {head_dim}",
                             "llama.cpp scales Gemma 3 attention by head_dim; export a released Gemma 3 size")
        for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(config, attr, None):
                raise ModelError(f"{attr} is set, which llama.cpp's gemma3 does not apply",
                                 "export a released Gemma 3 configuration")


def export_gguf(model_dir: Path, out: Path, quant: str = "q8_0", *, modelfile_path: Path | None = None,
                name: str | None = None) -> GgufResult:
    """Write `out` (atomically: a temporary file renamed at the end) and, unless `modelfile_path` is
    None, an Ollama Modelfile there. `model_dir` is a finished sqltune model folder."""
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant!r} is not allowed", f"use one of: {', '.join(QUANTS)}")
    gguf = _gguf()
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    model_dir = Path(model_dir)
    template = prompts.load_template(model_dir)  # refuses a folder sqltune did not write
    meta = manifests.read_meta(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in ARCHITECTURES:
        raise ModelError(f"architecture `{config.model_type}` is not exported to GGUF yet",
                         "GGUF export supports: " + "; ".join(f"{k} ({a.family})" for k, a in ARCHITECTURES.items()))
    spec = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, spec.gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir) if (model_dir / "generation_config.json").is_file() else None
    eos = (gen.eos_token_id if gen is not None else None) or tokenizer.eos_token_id
    eos_id = int(eos[0] if isinstance(eos, list) else eos)
    if meta.get("eos_token") in tokenizer.get_vocab():  # the token training ended every answer with
        eos_id = int(tokenizer.convert_tokens_to_ids(meta["eos_token"]))
    n_layers = int(config.num_hidden_layers)
    name = name or meta.get("name") or model_dir.name

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(int({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _architecture_metadata(writer, config, n_layers, config.model_type)
    from sqltune.export import vocab

    tokenizer_info = vocab.add_tokenizer(writer, gguf, model_dir, tokenizer, int(config.vocab_size), eos_id, meta)
    writer.add_chat_template(modelfile.jinja_chat_template(template))
    writer.add_string("sqltune.version", __version__)
    writer.add_string("sqltune.prompt_template", json.dumps(template.to_dict()))
    writer.add_array("sqltune.stop", list(template.stops))
    writer.add_uint32("sqltune.max_new_tokens", int(meta.get("max_new_tokens") or 128))
    if meta.get("base_model"):
        writer.add_string("sqltune.base_model", str(meta["base_model"]))

    tmap = gguf.TensorNameMap(arch, n_layers)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    n_head, n_kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    counts: dict[str, int] = {}
    logs.event(log, "gguf export starting", model=str(model_dir), out=str(out), quant=quant,
               architecture=config.model_type, layers=n_layers, **tokenizer_info)
    try:
        for hf_name, array in _weights(model_dir):
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue  # recomputed by the runner / the same tensor as token_embd
            found = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
            if found is None:
                raise ModelError(f"tensor {hf_name} has no GGUF name for architecture {config.model_type}",
                                 "the model has layers llama.cpp's llama architecture does not know")
            ttype, gguf_name = found
            if spec.norm_shift and gguf_name.endswith("norm.weight"):
                array = array + spec.norm_shift
            if spec.permute_qk and ttype in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
                array = permute_for_rope(array, n_head if ttype == gguf.MODEL_TENSOR.ATTN_Q else n_kv)
            layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
            # tied: token_embd is the output head too, so it gets the head's type (as llama.cpp's quantizer does)
            role = gguf.MODEL_TENSOR.OUTPUT if tied and ttype == gguf.MODEL_TENSOR.TOKEN_EMBD else ttype
            qtype = choose_type(gguf, quant, role, tuple(array.shape), layer, n_layers)
            data = _quantize(gguf, array, qtype)
            # quantized data arrives as bytes; the writer derives the element shape from the type
            writer.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype.kind == "u" else None)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=logs.show_progress())
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (disk_full(e) or _short_write(e)):
            raise ModelError(_no_space(out, _planned_bytes(writer)), NO_SPACE_FIX) from None
        raise

    written_modelfile = None
    if modelfile_path is not None:
        text = modelfile.render_modelfile(
            os.path.relpath(out, Path(modelfile_path).parent), template, eos_token=tokenizer.convert_ids_to_tokens(eos_id),
            max_new_tokens=int(meta.get("max_new_tokens") or 128),
            num_ctx=min(int(config.max_position_embeddings), 4096), name=_ollama_name(name))
        Path(modelfile_path).parent.mkdir(parents=True, exist_ok=True)
        Path(modelfile_path).write_text(text)
        written_modelfile = Path(modelfile_path)
    result = GgufResult(out, written_modelfile, quant, out.stat().st_size, round(time.monotonic() - t0, 2), counts,
                        config.model_type)
    logs.event(log, "gguf exported", **result.to_dict(), megabytes=round(result.bytes / 2**20, 1))
    return result


NO_SPACE_FIX = ("free space there, or write the file to a disk with room: --out for `sqltune export gguf`, "
                "--model-cache (MODEL_CACHE) for the copy `sqltune serve --engine llamacpp` exports once")


def _short_write(e: OSError) -> bool:
    """numpy's tofile on a full disk: "940032 requested and 927584 written", with no errno."""
    return e.errno is None and " requested and " in str(e) and str(e).rstrip().endswith("written")


def _planned_bytes(writer: Any) -> int:
    try:
        return sum(int(t.nbytes) for shard in writer.tensors for t in shard.values())
    except (AttributeError, TypeError):
        return 0


def _no_space(out: Path, planned: int) -> str:
    """What a full disk looks like to the user: where, how much the file needed, how much is free."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = -1
    need = f"the GGUF needs about {planned / 2**20:.1f} MB; " if planned else ""
    room = f"{free / 2**20:.1f} MB free there" if free >= 0 else "free space unknown"
    return f"writing {out} failed: no space left on the disk of {out.parent} ({need}{room})"


def read_back(path: Path, template: prompts.PromptTemplate) -> Any:
    """A GGUF as transformers reads it (`gguf_file=`, dequantized to fp32), ready for sqltune.generation:
    the independent reader the round-trip checks compare against the source model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqltune import generation

    path = Path(path)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)  # dense fp32, as sqltune.models.gguf
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return generation.Loaded(model, tokenizer, template, path)


def _ollama_name(name: str) -> str:
    """Ollama model names are lower-case letters, digits, `-`, `_` and `.`."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-.")
    return cleaned or "sqltune-sql"


def parting_margin(source: Any, prompt: str, ours: str, theirs: str) -> float:
    """The source model's log-prob gap between its top two tokens where two completions first differ: near
    0 is a tie that rounding the weights may flip, not a different answer (the round-trip checks report it)."""
    import torch

    tok = source.tokenizer
    a, b = tok(ours, add_special_tokens=False)["input_ids"], tok(theirs, add_special_tokens=False)["input_ids"]
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    ids = torch.tensor([prompts.encode_prompt(tok, prompt) + a[:k]])
    with torch.inference_mode():
        top = torch.topk(torch.log_softmax(source.model(input_ids=ids).logits[0, -1].float(), -1), 2).values
    return float(top[0] - top[1])
