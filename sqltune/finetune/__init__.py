"""The fine-tuning job (`job`): base models, tiny / hub / GGUF (`base_models`, `gguf`), TRL's trainer
built from the Config (`trainer`), callbacks, merge and export (`export`), the held-out check
(`heldout`), and `sqltune finetune` (`cli`)."""
