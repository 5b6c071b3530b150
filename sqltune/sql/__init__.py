"""SQL execution for evaluation: a read-only SQLite sandbox (sandbox), CREATE TABLE contexts
parsed with sqlglot (schema), seeded databases that make a gold query select something
(synth_db), and the metrics that compare a predicted query with the gold one (metrics, score).
"""
