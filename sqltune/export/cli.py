"""`sqltune export gguf`: a finished model as a GGUF file for llama.cpp and Ollama, plus a Modelfile.

    sqltune export gguf --model models/smollm2-135m-sql --out smollm2-sql.Q8_0.gguf
    sqltune export gguf --model gs://bucket/models/gemma-2b-sql --out sql.f16.gguf --quant f16
    ollama create smollm2-sql -f Modelfile && ollama run smollm2-sql
    llama-server -m smollm2-sql.Q8_0.gguf     # its chat endpoint builds the trained prompt (system = schema)

--quant: f16 (the source's greedy output but for fp16-rounding ties), q8_0 (half the size, close; the
default), q4_k_m (about a third of f16, lossy on small models; tensors whose rows a 256-value block does
not divide fall back to q5_0 / q8_0). `python benchmarks/gguf_round_trip.py --model DIR` measures them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sqltune import config, logs
from sqltune.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="Export a finished model to other runtimes (GGUF for llama.cpp / Ollama).",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="One GGUF file (weights, tokenizer, prompt template, EOS) and an Ollama "
                           "Modelfile.", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from sqltune.export.gguf import QUANTS

    g.add_argument("--out", required=True, metavar="FILE", help="The .gguf file to write.")
    g.add_argument("--quant", default="q8_0", choices=QUANTS, help="Weight type (default q8_0).")
    g.add_argument("--modelfile", default=None, metavar="FILE",
                   help="Where the Ollama Modelfile goes; default `Modelfile` beside --out; `none` = skip it.")
    config.add_arguments(g, groups=["buckets"], fields={"model_name": "A finished model folder or bucket URL."})
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqltune.artifacts import registry, storage
    from sqltune.export.gguf import export_gguf

    cfg, sources = config.from_namespace(args)
    logs.setup(cfg.log_level)
    if "model_name" not in sources:
        raise ConfigError("sqltune export gguf needs --model", "pass --model with a finished model folder or bucket URL")
    out = Path(args.out)
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"--out {args.out}: a GGUF file name ends in .gguf", f"pass e.g. --out {out.with_suffix('.gguf')}")
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder", "pass a file name such as models/sql.Q8_0.gguf")
    _check_writable(out, args.out)
    storage.configure(cfg)
    modelfile = None if args.modelfile == "none" else Path(args.modelfile or out.parent / "Modelfile")
    folder = registry.resolve_model(cfg.model_name)
    result = export_gguf(folder, out, args.quant, modelfile_path=modelfile)
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def _check_writable(out: Path, given: str) -> None:
    """Refuse an --out that cannot be written before any work: its folder is made only below an existing
    folder other than the filesystem root (`/nonexistent/dir/x.gguf` is a typo, not a request for
    /nonexistent), and that folder must take a file (/proc does not)."""
    import tempfile

    folder = out.resolve().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if existing != folder and existing == Path(existing.anchor):
        raise ConfigError(f"--out {given}: folder {folder} does not exist",
                          "create it first, or pass a path inside an existing folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"--out {given}: cannot write in {existing}: {e.strerror or e}",
                          "pass a path in a folder you can write to") from None
