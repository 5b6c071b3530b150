"""Generation backends behind one `typing.Protocol` (`base`): transformers with dynamic batching
(`transformers_engine`) and vLLM's AsyncLLM (`vllm_engine`), picked by name in `factory` (its ENGINES
are the `--engine` choices of serve, eval and ask). The server drives them directly; batch callers
(eval, ask, the job's held-out check, benchmarks) drive the same engines synchronously through `batch`."""
