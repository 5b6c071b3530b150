"""Generation backends behind one `typing.Protocol` (`base`): transformers with dynamic batching
(`transformers_engine`) and vLLM's AsyncLLM (`vllm_engine`), picked by `factory`."""
