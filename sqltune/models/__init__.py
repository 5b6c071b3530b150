"""Where a base model comes from and how it is loaded for training (`base_models`: hub id, local folder,
the tiny model; `gguf`: a local `.gguf` file or an embedded package, converted once into the model cache)."""
