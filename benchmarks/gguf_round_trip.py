"""GGUF export round trip: size, export time, and how closely the file (read back by transformers'
own GGUF reader) answers like the source model, per quant type.

    python benchmarks/gguf_round_trip.py --model models/smollm2-135m-sql
    python benchmarks/gguf_round_trip.py --model models/tiny-sql --quants f16 q8_0 q4_k_m --prompts 40

The prompt set: the export parity questions, then `--prompts` rows of ../shared data (synthetic rows
if absent), built with the model's own template. Figures per quant: greedy agreement (whole
completion equal), first-token agreement, the largest logit difference at the prompt's last
position relative to the logit range, and for each completion that differs the source's margin
between its top two tokens where they part (a small margin is a near-tie that rounding can flip).
Results go to benchmarks/results/gguf_round_trip_<model>.json, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def prompt_set(n: int) -> list[tuple[str, str]]:
    from sqltune.export.merge import PARITY_QUESTIONS

    if SHARED.is_file():
        rows = [json.loads(line) for line in SHARED.open().readlines()[:n]]
    else:
        from sqltune.data import synthetic

        rows = list(synthetic.generate(n, seed=7))
    return list(PARITY_QUESTIONS) + [(r["question"], r["context"]) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A finished sqltune model folder.")
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--prompts", type=int, default=20, help="Rows of data beside the parity questions.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch

    from sqltune import generation, prompts
    from sqltune.engines import batch
    from sqltune.export.gguf import export_gguf, read_back

    torch.set_num_threads(2)
    source = generation.load(args.model, dtype="fp32")
    pairs = prompt_set(args.prompts)
    texts = [source.template.build_prompt(q, c) for q, c in pairs]
    ref = batch.generate(source, texts, args.max_new_tokens)

    def last_logits(loaded: generation.Loaded, text: str) -> torch.Tensor:
        ids = torch.tensor([prompts.encode_prompt(loaded.tokenizer, text)])
        with torch.inference_mode():
            return loaded.model(input_ids=ids).logits[0].float()

    # the model by what it is, not where it lies (results keep no machine's paths)
    trained = {"base_model": source.meta.get("base_model"), "method": source.meta.get("method"),
               "steps": (source.meta.get("metrics") or {}).get("steps"), "prompt_style": source.template.name}
    results = {"model": trained, "prompts": len(texts), "max_new_tokens": args.max_new_tokens, "quants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants:
            t0 = time.perf_counter()
            info = export_gguf(Path(args.model), Path(tmp) / f"m.{quant}.gguf", quant, modelfile_path=None)
            export_s = time.perf_counter() - t0
            back = read_back(info.path, source.template)
            load_s = time.perf_counter() - t0 - export_s
            got = batch.generate(back, texts, args.max_new_tokens)
            same = [a.text == b.text for a, b in zip(ref, got, strict=True)]
            worst, first_same, margins = 0.0, 0, []
            for text, a, b, ok in zip(texts, ref, got, same, strict=True):
                la = last_logits(source, text)[-1]
                lb = last_logits(back, text)[-1]
                worst = max(worst, float((la - lb).abs().max() / (la.max() - la.min())))
                first_same += int(la.argmax() == lb.argmax())
                if not ok:  # where the two completions part, how close was the source's choice?
                    ids_a = source.tokenizer(a.text, add_special_tokens=False)["input_ids"]
                    ids_b = back.tokenizer(b.text, add_special_tokens=False)["input_ids"]
                    k = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y),
                             min(len(ids_a), len(ids_b)))
                    ids = torch.tensor([prompts.encode_prompt(source.tokenizer, text) + ids_a[:k]])
                    with torch.inference_mode():
                        logits = source.model(input_ids=ids).logits[0, -1].float()
                    top = torch.topk(torch.log_softmax(logits, -1), 2).values
                    margins.append(round(float(top[0] - top[1]), 4))
            results["quants"][quant] = {
                "bytes": info.bytes, "megabytes": round(info.bytes / 2**20, 2), "export_s": round(export_s, 2),
                "load_s": round(load_s, 2), "tensor_types": info.tensor_types,
                "greedy_agreement": round(sum(same) / len(same), 4), "agree": sum(same),
                "first_token_agreement": round(first_same / len(texts), 4),
                "max_rel_logit_diff": round(worst, 5), "logprob_margins_where_they_part": margins,
            }
            print(json.dumps({quant: results["quants"][quant]}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gguf_round_trip_{trained['base_model']}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
