"""`sqltune ask`: a question answered on a real database by a model, read-only (sqltune.db does the database part)."""
