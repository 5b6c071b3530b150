"""Questions per second of `sqltune eval --model`'s generation, and whether its greedy SQL is unchanged,
before and after eval moved onto the serving engine (sqltune.engines.batch).

    flock /tmp/sqltune-bench.lock python benchmarks/generation_speed.py --model /work/main/models/smollm2-135m-sql \
        --limit 200 --batch-sizes 8 16 --constrain-limit 40

"Before" is the batched `model.generate` loop eval used until then (`legacy_generate` below, kept here
verbatim as the reference); "after" is `sqltune.evaluate.sources.from_model` on the transformers
engine with each batch size. Both run on the model's own eval split (dataset and eval fraction from
its sqltune.json, a seeded --limit sample), with its max_new_tokens; both times include loading the
model. Predictions are compared text for text (raw completion and extracted SQL), free and, on the
first --constrain-limit questions, under --constrain schema. Writes benchmarks/results/generation_speed.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqltune import prompts  # noqa: E402


def legacy_generate(loaded: Any, prompts_: Sequence[str], max_new_tokens: int,
                    grammars: Sequence[str] | None = None) -> list[str]:
    """The old sqltune.generation.generate, greedy: one left-padded batch through `model.generate`."""
    import torch

    from sqltune import constrain, generation

    tok = loaded.tokenizer
    batch = generation.encode_batch(tok, prompts_).to(loaded.device)
    limits = [max_new_tokens] * len(prompts_)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                              "eos_token_id": loaded.model.generation_config.eos_token_id or tok.eos_token_id,
                              "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if grammars and any(grammars):
        matchers = [loaded.compiler.matcher(g) if g else None for g in grammars]
        kwargs["logits_processor"] = [constrain.logits_processor(matchers, loaded.compiler, limits,
                                                                  batch["input_ids"].shape[1])]
    with torch.inference_mode():
        out = loaded.model.generate(**batch, **kwargs)
    eos = kwargs["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    texts = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ids = []
        for t in row:
            if t in eos:
                break
            ids.append(t)
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts


def legacy_eval(model: str, pairs: Sequence[tuple[str, str]], batch_size: int, max_new_tokens: int,
                constrain: str = "off") -> list[str]:
    """The old `sources.from_model`: batches of prompts sorted by length in characters."""
    from sqltune import constrain as cons
    from sqltune import generation

    loaded = generation.load(model)
    texts = [loaded.template.build_prompt(q, c) for q, c in pairs]
    grammars = [cons.build(constrain, q, c).grammar for q, c in pairs]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        done = legacy_generate(loaded, [texts[i] for i in idx], max_new_tokens, [grammars[i] for i in idx])
        for i, text in zip(idx, done, strict=True):
            out[i] = text
    return out


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _timed(fn: Any, n: int) -> tuple[Any, dict[str, Any]]:
    cpu, start = _cpu(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - start
    return out, {"seconds": round(wall, 2), "questions_per_s": round(n / wall, 3), "cpu_seconds": round(_cpu() - cpu, 2),
                 "load_average_1m": round(os.getloadavg()[0], 2)}


def _compare(before: Sequence[str], after: Sequence[str], pairs: Sequence[tuple[str, str]], template: Any,
             eos: str | None) -> dict[str, Any]:
    sql_b = [prompts.extract_sql(t, eos, template) for t in before]
    sql_a = [prompts.extract_sql(t, eos, template) for t in after]
    differ = [i for i in range(len(before)) if before[i] != after[i]]
    return {"identical_raw": len(before) - len(differ), "identical_sql": sum(a == b for a, b in zip(sql_a, sql_b, strict=True)),
            "of": len(before),
            "differences": [{"question": pairs[i][0], "before": before[i], "after": after[i]} for i in differ[:5]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A finished model folder.")
    parser.add_argument("--limit", type=int, default=200, help="Eval-split questions.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16], help="Engine capacities to time.")
    parser.add_argument("--legacy-batch-size", type=int, default=8, help="The old loop's batch (eval's default).")
    parser.add_argument("--constrain-limit", type=int, default=40, help="Questions compared under --constrain schema.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/generation_speed.json"))
    args = parser.parse_args(argv)

    from sqltune import generation
    from sqltune.artifacts import manifests
    from sqltune.config import Config
    from sqltune.evaluate import cli as eval_cli
    from sqltune.evaluate import sources

    meta = manifests.read_meta(Path(args.model))
    cfg = dataclasses.replace(Config(), eval_split="eval", eval_limit=args.limit)
    examples, dataset = eval_cli.load_examples(cfg, {}, meta)
    pairs = [(ex.question, ex.context) for ex in examples]
    max_new = int(meta.get("max_new_tokens") or cfg.eval_max_new_tokens)
    loaded = generation.load(args.model)
    template, eos = loaded.template, loaded.tokenizer.eos_token
    del loaded
    result: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).relative_to(ROOT).as_posix()
                                         if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model,
        "dataset": {k: dataset[k] for k in ("source", "split", "eval_fraction", "examples", "fingerprint")},
        "max_new_tokens": max_new, "cpu_count": os.cpu_count(), "torch_threads": _threads(),
    }
    before, result["before"] = _timed(lambda: legacy_eval(args.model, pairs, args.legacy_batch_size, max_new),
                                      len(pairs))
    result["before"]["batch_size"] = args.legacy_batch_size
    print("before:", result["before"], flush=True)
    result["after"] = []
    for size in args.batch_sizes:
        (preds, _), timing = _timed(lambda s=size: sources.from_model(
            args.model, pairs, batch_size=s, max_new_tokens=max_new, progress=lambda n: None, engine="transformers"),
            len(pairs))
        entry = {"batch_size": size, **timing, **_compare(before, [p.raw for p in preds], pairs, template, eos)}
        result["after"].append(entry)
        print("after:", {k: v for k, v in entry.items() if k != "differences"}, flush=True)
    if args.constrain_limit:
        few = pairs[: args.constrain_limit]
        cb, tb = _timed(lambda: legacy_eval(args.model, few, args.legacy_batch_size, max_new, "schema"), len(few))
        (ca, _), ta = _timed(lambda: sources.from_model(args.model, few, batch_size=args.legacy_batch_size,
                                                        max_new_tokens=max_new, progress=lambda n: None,
                                                        constrain="schema", engine="transformers"), len(few))
        result["constrain_schema"] = {"before": tb, "after": ta, **_compare(cb, [p.raw for p in ca], few, template, eos)}
        print("constrain schema:", {k: v for k, v in result["constrain_schema"].items() if k != "differences"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
