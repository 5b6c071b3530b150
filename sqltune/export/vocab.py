"""The tokenizer half of a GGUF: every `tokenizer.*` field llama.cpp reads when it loads a model.

llama.cpp refuses a file whose `tokenizer.ggml.pre` (how text is split before BPE) it does not know,
and splits wrongly with a right-looking but wrong one. Two sources, in order:

1. The base GGUF, when the model was fine-tuned from one (an embedded package or a local `.gguf`;
   sqltune.json records it under `base`): its tokenizer fields are copied as they are (vocabulary,
   scores, token types, merges, special ids, pre-tokenizer), since the fine-tune kept its vocabulary.
2. Otherwise the model folder's tokenizer.json. Byte-level BPE is named the way llama.cpp's own
   converter names it: the token ids of a fixed check text, hashed, looked up in the table of
   tokenizers llama.cpp implements; a tokenizer whose hash is unknown but which is plain GPT-2
   byte-level BPE (the tiny model's) is `gpt-2`; anything else is refused by name before a file is
   written. SentencePiece BPE (Gemma, Llama 2) becomes llama.cpp's `llama` vocabulary: pieces, scores
   ranking the merges, byte / control / user-defined types (for Gemma-3-270M the pieces and types
   equal the released GGUF's, and llama.cpp tokenizes as transformers does: tests/test_export_gguf.py).

Either way BOS / EOS follow the trained prompt: BOS is added exactly when `prompts.encode_prompt`
adds it, EOS is the token the model learned to end answers with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqltune import logs, prompts
from sqltune.errors import ModelError

log = logs.get("export.vocab")

# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre): its token ids tell pre-tokenizers apart
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f '
    '(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 '
    '3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785'
    '\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= '
    '\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 '
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's pre-tokenizer name, for the tokenizers of
# model families sqltune fine-tunes (the values llama.cpp's converter records for them)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
}

# written from the trained model whatever the base says: its prompt as a chat template, its EOS, its BOS habit
OWN_KEYS = ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")


def check_hash(tokenizer: Any) -> str:
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def identify_pre_tokenizer(tokenizer: Any, spec: dict[str, Any], name: str) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text, or a ModelError naming it."""
    digest = check_hash(tokenizer)
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    pre = spec.get("pre_tokenizer") or {}
    # a vocabulary of its own (the tiny model) but GPT-2's split: ByteLevel with its built-in GPT-2 regex
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    raise ModelError(f"llama.cpp does not know the pre-tokenizer of {name} (check hash {digest[:16]}..., "
                     f"{json.dumps(pre)[:160]})",
                     "export a base whose tokenizer llama.cpp implements (Llama 3, SmolLM2, Qwen 2, GPT-2, "
                     "Gemma), or fine-tune from that base's GGUF so its tokenizer is carried over")


def base_gguf(meta: dict[str, Any]) -> Path | None:
    """The GGUF the model's base was converted from, when sqltune.json names one that still exists."""
    base = meta.get("base") or {}
    if base.get("kind") != "gguf" or not base.get("gguf"):
        return None
    path = Path(base["gguf"])
    if not path.is_file():
        log.warning("base GGUF %s is gone; identifying the tokenizer from the model folder instead", path)
        return None
    return path


def copy_from_gguf(writer: Any, gguf: Any, source: Path, tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """Every tokenizer field of `source` except its chat template; checks the vocabulary still fits."""
    reader = gguf.GGUFReader(str(source))
    V = gguf.GGUFValueType
    copied: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key in OWN_KEYS:
            continue
        vtype = V(field.types[0])
        sub = V(field.types[-1]) if vtype == V.ARRAY else None
        value = field.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
        copied[key] = value
    tokens = copied.get("tokenizer.ggml.tokens") or []
    if len(tokens) != n_vocab or len(tokenizer) > n_vocab:
        raise ModelError(f"the base GGUF {source} has {len(tokens)} tokens but the model {n_vocab} embedding rows "
                         f"(its tokenizer {len(tokenizer)})",
                         "the fine-tune changed the vocabulary; export needs the base's vocabulary unchanged")
    return copied


def _token_types(gguf: Any, tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    T = gguf.TokenType
    special = set(tokenizer.all_special_ids)
    added = dict(tokenizer.added_tokens_decoder.items())
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = []
    for i in range(len(tokens)):
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


def write_from_tokenizer(writer: Any, gguf: Any, folder: Path, tokenizer: Any, n_vocab: int, name: str) -> str:
    """A byte-level BPE tokenizer from the model folder's tokenizer.json; returns the pre-tokenizer."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec.get("model") or {}
    if is_sentencepiece_bpe(spec):
        return write_sentencepiece(writer, gguf, spec, tokenizer, n_vocab)
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError(f"{name}: a {model.get('type')} tokenizer that is neither byte-level BPE nor SentencePiece BPE",
                         "export a base with a tokenizer llama.cpp implements (Llama 3, SmolLM2, Qwen 2, Gemma), or "
                         "fine-tune from that base's GGUF so its tokenizer is carried over")
    pre = identify_pre_tokenizer(tokenizer, spec, name)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tokens, types = _token_types(gguf, tokenizer, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    return pre


def is_sentencepiece_bpe(spec: dict[str, Any]) -> bool:
    """A SentencePiece BPE vocabulary in tokenizer.json form (Gemma, Llama 2): BPE over `▁`-for-space
    text with byte fallback, which llama.cpp runs as its `llama` (SPM) tokenizer."""
    model = spec.get("model") or {}
    rules = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in rules


def write_sentencepiece(writer: Any, gguf: Any, spec: dict[str, Any], tokenizer: Any, n_vocab: int) -> str:
    """llama.cpp's SPM vocabulary from tokenizer.json: the pieces in id order, scores that rank merges as
    the BPE merges do (a piece made by merge k scores -k: llama.cpp merges the best-scoring pair first),
    byte pieces `<0xXX>` as BYTE, added tokens as CONTROL (special) or USER_DEFINED."""
    T = gguf.TokenType
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    pieces = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(T.UNUSED)] * n_vocab
    for piece, i in vocab.items():
        if i < n_vocab:
            pieces[i], scores[i], types[i] = piece, 0.0, int(T.NORMAL)
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and i < n_vocab and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    for piece, i in vocab.items():
        if i < n_vocab and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[i] = int(T.BYTE)
    space_prefix = '"Prepend"' in json.dumps(spec.get("normalizer") or {})  # Llama 2 prepends `▁`; Gemma does not
    if not space_prefix:  # Gemma's SentencePiece model declares its runs of spaces user-defined, as plain spaces
        for piece, i in vocab.items():
            if i < n_vocab and len(piece) > 1 and set(piece) == {"\u2581"}:
                pieces[i], scores[i], types[i] = " " * len(piece), -1000.0, int(T.USER_DEFINED)
    for added in spec.get("added_tokens") or []:
        i = int(added["id"])
        if i < n_vocab:
            pieces[i], scores[i] = added["content"], -1000.0
            types[i] = int(T.CONTROL if added.get("special") else T.USER_DEFINED)
    if len(tokenizer) > n_vocab:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {n_vocab} rows",
                         "the model folder is inconsistent; re-export it with `sqltune finetune`")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, value in (("bos", tokenizer.bos_token_id), ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    writer.add_add_eos_token(False)
    writer.add_add_sep_token(False)
    writer.add_add_space_prefix(space_prefix)
    return "default"


def add_tokenizer(writer: Any, gguf: Any, folder: Path, tokenizer: Any, n_vocab: int, eos_id: int,
                  meta: dict[str, Any]) -> dict[str, Any]:
    """Write the tokenizer fields; returns where they came from and the pre-tokenizer, for the log."""
    name = str((meta.get("base") or {}).get("source") or meta.get("base_model") or folder)
    source = base_gguf(meta)
    if source is not None:
        copied = copy_from_gguf(writer, gguf, source, tokenizer, n_vocab)
        info = {"tokenizer_from": str(source), "pre_tokenizer": copied.get("tokenizer.ggml.pre"),
                "tokenizer_model": copied.get("tokenizer.ggml.model")}
    else:
        pre = write_from_tokenizer(writer, gguf, folder, tokenizer, n_vocab, name)
        info = {"tokenizer_from": "tokenizer.json", "tokenizer_model": "llama" if pre == "default" else "gpt2",
                "pre_tokenizer": pre}
    # the trained prompt's ids, whatever the base said: EOS the model ends answers with, BOS when training added it
    writer.add_eos_token_id(eos_id)
    probe = prompts.encode_prompt(tokenizer, "x")
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    return info
