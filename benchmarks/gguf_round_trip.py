"""GGUF export round trip through llama.cpp itself: size, export time, and how closely llama.cpp (the
xllamacpp wheel, the runtime Ollama and llama-server share) answers like the source model, per quant.

    python benchmarks/gguf_round_trip.py --model models/smollm2-135m-sql            # 40 held-out prompts
    python benchmarks/gguf_round_trip.py --model /tmp/gemma-sql --quants f16 q8_0 --prompts 40

The prompt set: `--prompts` held-out rows of ../shared data (the rows training's eval split keeps out,
by question hash; synthetic rows if the data is absent), built with the model's own template. Per
quant: whether llama.cpp loads the file at all, llama.cpp's own tokenization of every prompt against
`prompts.encode_prompt` (BOS included), greedy agreement with the transformers fp32 source (whole
completion equal), first-token agreement, and for each completion that differs the source's margin
between its top two tokens where they part (a small margin is a near-tie that rounding can flip).
Results go to benchmarks/results/gguf_round_trip_<base>.json, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def held_out(n: int, fraction: float = 0.05) -> list[tuple[str, str]]:
    from sqltune.data.loading import is_eval

    if SHARED.is_file():
        rows = []
        for line in SHARED.open():
            row = json.loads(line)
            if is_eval(row["question"], fraction):
                rows.append((row["question"], row["context"]))
            if len(rows) == n:
                return rows
        return rows
    from sqltune.data import synthetic

    return [(r["question"], r["context"]) for r in synthetic.generate(n, seed=7)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A finished sqltune model folder.")
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--prompts", type=int, default=40, help="Held-out rows of the shared data.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch

    from sqltune import generation, prompts
    from sqltune.engines import batch
    from sqltune.engines import llamacpp_engine as llamacpp
    from sqltune.export.gguf import export_gguf, parting_margin

    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    source = generation.load(args.model, dtype="fp32")
    pairs = held_out(args.prompts)
    texts = [source.template.build_prompt(q, c) for q, c in pairs]
    ids = [prompts.encode_prompt(source.tokenizer, t) for t in texts]
    t0 = time.perf_counter()
    ref = [c.text for c in batch.generate(source, texts, args.max_new_tokens)]
    hf_s = time.perf_counter() - t0

    # the model by what it is, not where it lies (results keep no machine's paths)
    trained = {"base_model": source.meta.get("base_model"), "method": source.meta.get("method"),
               "steps": (source.meta.get("metrics") or {}).get("steps"), "prompt_style": source.template.name}
    results = {"model": trained, "prompts": len(texts), "held_out": SHARED.is_file(),
               "max_new_tokens": args.max_new_tokens, "threads": threads, "transformers_fp32_s": round(hf_s, 2),
               "runtime": f"llama.cpp (xllamacpp {__import__('xllamacpp').__version__})", "quants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants:
            t0 = time.perf_counter()
            info = export_gguf(Path(args.model), Path(tmp) / f"m.{quant}.gguf", quant, modelfile_path=None)
            export_s = time.perf_counter() - t0
            server = llamacpp.open_server(info.path, slots=1, threads=threads)
            load_s = time.perf_counter() - t0 - export_s
            tokens_same = sum(llamacpp.tokenize(server, t) == i for t, i in zip(texts, ids, strict=True))
            t1 = time.perf_counter()
            got = [llamacpp.complete_ids(server, i, args.max_new_tokens) for i in ids]
            gen_s = time.perf_counter() - t1
            del server
            same = [a == b for a, b in zip(ref, got, strict=True)]
            first = sum(bool(a) and bool(b) and source.tokenizer(a, add_special_tokens=False)["input_ids"][:1]
                        == source.tokenizer(b, add_special_tokens=False)["input_ids"][:1] for a, b in zip(ref, got, strict=True))
            parted = [{"source": a, "llama.cpp": b, "margin": round(parting_margin(source, t, a, b), 4)}
                      for t, a, b, ok in zip(texts, ref, got, same, strict=True) if not ok]
            results["quants"][quant] = {
                "bytes": info.bytes, "megabytes": round(info.bytes / 2**20, 2), "export_s": round(export_s, 2),
                "llamacpp_load_s": round(load_s, 2), "llamacpp_generate_s": round(gen_s, 2),
                "tensor_types": info.tensor_types, "tokenization_equal": f"{tokens_same}/{len(texts)}",
                "greedy_agreement": round(sum(same) / len(same), 4), "agree": sum(same),
                "first_token_agreement": round(first / len(texts), 4),
                "logprob_margins_where_they_part": [p["margin"] for p in parted], "parted": parted[:5],
            }
            print(json.dumps({quant: {k: v for k, v in results["quants"][quant].items() if k != "parted"}}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gguf_round_trip_{trained['base_model']}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
