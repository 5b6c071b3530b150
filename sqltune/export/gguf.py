"""A finished sqltune model as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile.

    sqltune export gguf --model models/smollm2-135m-sql --out smollm2-sql.Q8_0.gguf --quant q8_0

The weights go through the `gguf` package: its `TensorNameMap` names every tensor the way llama.cpp
expects, its writer lays out the file and its quantizers make q8_0 (the k-quants of q4_k_m come from
sqltune.export.kquants, checked against gguf's own dequantizers). The metadata carries what a
runner needs to use the model as trained: the byte-level BPE tokenizer (vocabulary, merges, special
ids, whether BOS is added), EOS, a chat template that builds the trained prompt (modelfile.py) and
the raw template under `sqltune.*` keys. transformers reads the file back (`gguf_file=`), which the
round-trip test uses to check greedy output against the source model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune import __version__, logs, prompts
from sqltune.artifacts import manifests
from sqltune.errors import ConfigError, ModelError
from sqltune.export import modelfile

log = logs.get("export.gguf")

QUANTS = ("f16", "q8_0", "q4_k_m")
# Hugging Face model_type -> (gguf architecture name, whether q/k rows are permuted for llama.cpp's rope layout)
ARCHITECTURES = {"llama": ("LLAMA", True)}


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


def _token_types(gguf: Any, tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    T = gguf.TokenType
    special = set(tokenizer.all_special_ids)
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = []
    for i, _tok in enumerate(tokens):
        if i in special or (i in added and added[i].special):
            types.append(int(T.CONTROL))
        elif i in added:
            types.append(int(T.USER_DEFINED))
        else:
            types.append(int(T.NORMAL))
    if len(tokens) > n_vocab:
        raise ModelError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {n_vocab} rows",
                         "the model folder is inconsistent; re-export it with `sqltune finetune`")
    for i in range(len(tokens), n_vocab):  # rows the model has and the tokenizer never produces
        tokens.append(f"[PAD{i}]")
        types.append(int(T.UNUSED))
    return tokens, types


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE, read from tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
            regex = (steps[0].get("pattern") or {}).get("Regex")
            try:
                from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
            except ImportError:
                GGUF_PRE_TOKENIZER_SPLITS = {}  # noqa: N806
            for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
                if known == regex:
                    return name
    raise ModelError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent",
                     "GGUF export supports byte-level BPE tokenizers that split like GPT-2, Llama 3 or Qwen 2")


def _add_tokenizer(writer: Any, gguf: Any, folder: Path, tokenizer: Any, n_vocab: int, eos_id: int) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError(f"{folder}: tokenizer type {model.get('type')} is not byte-level BPE",
                         "GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen, the tiny model) only")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    tokens, types = _token_types(gguf, tokenizer, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(eos_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    # BOS exactly when encode_prompt adds it, so llama.cpp feeds the ids training saw
    probe = prompts.encode_prompt(tokenizer, "x")
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def _architecture_metadata(writer: Any, config: Any, n_layers: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelError(f"rope scaling {rope.get('rope_type') or rope.get('type')} is not exported to GGUF yet",
                         "export a model with plain rope (SmolLM2, the tiny model)")
    theta = getattr(config, "rope_theta", None) or rope.get("rope_theta") or 10000.0
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


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
                         f"GGUF export supports: {', '.join(ARCHITECTURES)} (the tiny model, SmolLM2, Llama)")
    arch_name, permute = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir) if (model_dir / "generation_config.json").is_file() else None
    eos = (gen.eos_token_id if gen is not None else None) or tokenizer.eos_token_id
    eos_id = int(eos[0] if isinstance(eos, list) else eos)
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
    _architecture_metadata(writer, config, n_layers)
    _add_tokenizer(writer, gguf, model_dir, tokenizer, int(config.vocab_size), eos_id)
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
               architecture=config.model_type, layers=n_layers)
    try:
        for hf_name, array in _weights(model_dir):
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue  # recomputed by the runner / the same tensor as token_embd
            found = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
            if found is None:
                raise ModelError(f"tensor {hf_name} has no GGUF name for architecture {config.model_type}",
                                 "the model has layers llama.cpp's llama architecture does not know")
            ttype, gguf_name = found
            if permute and ttype in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
                array = permute_for_rope(array, n_head if ttype == gguf.MODEL_TENSOR.ATTN_Q else n_kv)
            layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
            qtype = choose_type(gguf, quant, ttype, tuple(array.shape), layer, n_layers)
            data = _quantize(gguf, array, qtype)
            # quantized data arrives as bytes; the writer derives the element shape from the type
            writer.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype.kind == "u" else None)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=logs.show_progress())
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
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
