"""Does a training run slow down or grow as it goes? Step time, tokens/s, RSS and page faults per window.

    python benchmarks/train_growth.py --steps 60
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/train_growth.py --steps 60 --label mmap1m   # glibc, fixed threshold
    python benchmarks/train_growth.py --steps 60 --trim-every 1 --label trim1    # glibc malloc_trim(0) after each step

The demo recipe (configs/<model>-cpu.yaml: SmolLM2's is a bf16 full fine-tune) on the shared rows, in this
process, with a callback that samples the clock, resident memory, minor page faults and system CPU time at
the end of every step. Each window of --window steps is one row. Appends to
benchmarks/results/train_growth_<model>.json; figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def run(model_name: str, steps: int, workdir: Path, trim_every: int = 0) -> list[tuple[float, float, int, int, float]]:
    import ctypes

    import psutil
    from train_throughput import load_recipe
    from transformers import TrainerCallback

    from sqltune.finetune import trainer as sft

    cfg, precision, _, tok, model, train_ds = load_recipe(model_name, {"max_steps": str(steps)})
    proc = psutil.Process()
    marks: list[tuple[float, float, int, int, float]] = []

    libc = ctypes.CDLL("libc.so.6") if trim_every else None

    class Probe(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if libc is not None and state.global_step % trim_every == 0:
                libc.malloc_trim(0)  # hand the heap's free pages back to the kernel
            usage = resource.getrusage(resource.RUSAGE_SELF)
            marks.append((time.perf_counter(), proc.memory_info().rss / 2**20, usage.ru_minflt,
                          int(state.num_input_tokens_seen), usage.ru_stime))

    trainer = sft.build_trainer(cfg, cfg.method, precision, model, tok, train_ds, None, workdir, [Probe()])
    trainer.train()
    return marks


def windows(marks: list[tuple[float, float, int, int, float]], size: int) -> list[dict[str, Any]]:
    rows = []
    for a in range(0, len(marks) - size, size):
        (t0, _, f0, n0, s0), (t1, rss, f1, n1, s1) = marks[a], marks[a + size]
        rows.append({"steps": f"{a + 2}-{a + size + 1}", "s_per_step": round((t1 - t0) / size, 2),
                     "tokens_per_s": round((n1 - n0) / (t1 - t0)), "rss_mb": round(rss),
                     "minor_faults_per_step": (f1 - f0) // size, "sys_s_per_step": round((s1 - s0) / size, 2)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--trim-every", type=int, default=0, help="call glibc's malloc_trim(0) every N steps")
    parser.add_argument("--label", default="default")
    parser.add_argument("--workdir", default="/tmp/sqltune-bench-growth")
    args = parser.parse_args()
    if not SHARED.is_file():
        print(f"no data at {SHARED}", file=sys.stderr)
        return 1
    rows = windows(run(args.model, args.steps, Path(args.workdir) / args.label, args.trim_every), args.window)
    path = RESULTS / f"train_growth_{args.model}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs.append({"label": args.label, "command": "python benchmarks/train_growth.py " + " ".join(sys.argv[1:]),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "windows": rows})
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
