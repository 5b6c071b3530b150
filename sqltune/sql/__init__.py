"""SQL primitives: a read-only SQLite sandbox (`sandbox`), CREATE TABLE contexts parsed with sqlglot
(`schema`), seeded databases that make a gold query select something (`synth_db`), and the one
checker of a query against a schema (`check`)."""
