"""Generation backends behind one `typing.Protocol` (`base`): transformers with dynamic batching
(`transformers_engine`) and vLLM's AsyncLLM (`vllm_engine`), picked by `factory`. The server drives them
directly; batch callers (eval, ask, the job's held-out check) drive the same engines synchronously."""
