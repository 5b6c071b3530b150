"""sqltune: fine-tune an open LLM into a text-to-SQL model, publish it, serve it, measure it."""

__version__ = "0.1.0"
