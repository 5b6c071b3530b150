"""Real databases: `sqltune ask` and `sqltune eval --database` on PostgreSQL and SQLite files, read-only."""
