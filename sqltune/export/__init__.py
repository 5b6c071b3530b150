"""From a trained model to what other runtimes load: merge + parity (`merge`), the GGUF writer (`gguf`)
and its quantizers (`kquants`), Ollama's Modelfile (`modelfile`), and `sqltune export` (`cli`)."""
