"""`sqltune eval`: predictions from a model, a server or a file (`sources`), executed and scored
against the gold on synthesised databases (`score`, `metrics`), then reported (`report`, `cli`)."""
