"""Real databases, read-only: connect to PostgreSQL or a SQLite file, introspect the schema into a CREATE TABLE
context, transpile and gate one SELECT, run it bounded. Used by `sqltune ask` and `sqltune eval --database`."""
