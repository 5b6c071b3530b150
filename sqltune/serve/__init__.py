"""`sqltune serve`: one HTTP server for a finished model, on vLLM (GPU, or its CPU build) or transformers.

    sqltune serve --model ./models/sqltune-sql --port 8000

`app.create_app(config, engine)` builds the FastAPI app; engines live in `sqltune.engines` behind
one `typing.Protocol`; `protocol.py` holds the request and response models of every route.
"""
