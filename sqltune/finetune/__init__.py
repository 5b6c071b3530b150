"""The fine-tuning job (`job`): TRL's trainer built from the Config (`trainer`), callbacks, attempts and
the time budget, the held-out check (`heldout`), and `sqltune finetune` (`cli`). Where a base comes from
is `sqltune.models`; merging and exporting the result is `sqltune.export`."""
