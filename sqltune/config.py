"""The one Config schema behind YAML files, environment variables and CLI flags.

    sqltune config show --config configs/tiny-cpu.yaml --lora-r 16

A field `lora_r` is YAML key `lora_r`, environment `LORA_R` (or `SQLTUNE_LORA_R`) and flag
`--lora-r`: names are derived from the field, never listed twice. Precedence, lowest first:
defaults < --config YAML < environment < flags. `load(argv, environ)` is pure, so tests hand it
dicts instead of patching the process.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune.errors import ConfigError

# Fields whose values are secrets: read where used, never printed or written into an artifact.
SECRET_FIELDS = frozenset({"api_key"})
ENV_PREFIX = "SQLTUNE_"


def _f(default: Any, help: str, *, choices: Sequence[str] | None = None, minimum: float | None = None,
       maximum: float | None = None, aliases: Sequence[str] = (), env: Sequence[str] = (),
       group: str = "finetune") -> Any:
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum, "maximum": maximum,
            "aliases": tuple(aliases), "env": tuple(env), "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- model and method -------------------------------------------------------------------
    model_name: str = _f("tiny", "Base model: a hub id, a local folder, or `tiny` (a small Llama "
                         "built from scratch with a tokenizer trained on the data).", aliases=["--model"])
    new_model: str = _f("sqltune-sql", "Name of the fine-tuned model (artifact and served model name).")
    output: str = _f("", "Where the finished model goes: a folder, file://, gs:// or s3:// URL. "
                     "Default: models/<new_model>.", aliases=["-o"])
    method: str = _f("auto", "qlora (4-bit NF4 base + LoRA), lora, full; auto = full for `tiny`, qlora "
                     "on CUDA with bitsandbytes, lora otherwise; grpo = reinforcement from execution (docs/grpo.md): "
                     "the model's own SQL, sampled and rewarded by what it returns.",
                     choices=["auto", "qlora", "lora", "full", "grpo"])
    dtype: str = _f("auto", "Compute dtype; auto = bf16 on GPUs that support it, fp16 on older GPUs; on a CPU, "
                    "bf16 for training where it has AMX-BF16 / AVX512-BF16 (published in fp32), fp32 otherwise.",
                    choices=["auto", "bf16", "fp16", "fp32"])
    lora_r: int = _f(8, "LoRA rank.", minimum=1)
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r).", minimum=1)
    lora_dropout: float = _f(0.05, "LoRA dropout.", minimum=0.0)
    target_modules: list[str] = _f(["all-linear"], "Modules that get LoRA adapters "
                                   "(comma-separated, or all-linear).")
    prompt_style: str = _f("plain", "Prompt layout: plain = `Question: ...\\nContext: ...\\nAnswer:`; schema-first "
                           "= `Context: ...\\nQuestion: ...\\nAnswer:` (see shared_context_rows); chat = question and "
                           "schema as the user turn of the tokenizer's chat template, the SQL as the assistant turn; "
                           "auto = chat when the tokenizer has one, else plain.",
                           choices=["plain", "schema-first", "chat", "auto"])
    tiny_layers: int = _f(4, "Layers of the `tiny` model.", minimum=1)
    tiny_vocab_size: int = _f(2048, "Tokenizer vocabulary of the `tiny` model.", minimum=300)
    trust_remote_code: bool = _f(False, "Allow model repositories to run their own code.")

    # --- data -------------------------------------------------------------------------------
    dataset: str = _f("synthetic:3000", "Training data: a hub id, a .json/.jsonl/.parquet/.csv file, synthetic:N, "
                      "or spider:DIR (a folder in the Spider / BIRD layout: question files, tables.json, "
                      "database/<db_id>/<db_id>.sqlite; each row's context read from its own database). Several "
                      "sources: a YAML list or comma-separated, each with an optional weight, `a.jsonl,spider:DIR*2` "
                      "(each training row of DIR twice). With --database, a file of question / SQL pairs on it.")
    dataset_split: str = _f("train", "Split to read from a hub dataset.")
    dataset_limit: int = _f(-1, "Use a seeded random subset of this many valid rows; -1 = all.", minimum=-1)
    column_map: str = _f("", "Column mapping for other datasets: question=q,context=schema,answer=sql "
                         "(named so the shell's COLUMNS never leaks in).")
    eval_fraction: float = _f(0.05, "Share of questions held out for evaluation (by question hash).",
                              minimum=0.0)
    keep_literal_case: bool = _f(False, "Keep the answers' string literals as the dataset spells them; by default "
                                 "a literal matching a span of the question apart from letter case takes the "
                                 "question's spelling (sql-create-context lowercases them), in training and eval.")

    heldout_databases: list[str] = _f([], "db_ids whose questions form the eval split of a Spider / BIRD source "
                                      "(split by database, never by row); empty = sqltune's fixed held-out set of "
                                      "Spider's train databases where the source has them, else a hash of each "
                                      "db_id at --eval-fraction.")
    question_syn: bool = _f(False, "Also train on Spider-Syn's rewrite of each training question (`question_syn`: "
                            "schema words replaced by synonyms), same gold SQL.")
    multi_table_repeat: int = _f(1, "Train on each multi-table (Spider-style) row this many times per epoch: they "
                                 "are 6% of sql-create-context, and a model that seldom sees a JOIN seldom "
                                 "writes one. 1 = as the data has them.", minimum=1)

    # --- training ---------------------------------------------------------------------------
    learning_rate: float = _f(0.0, "Peak learning rate; 0 = by method: 3e-3 for the from-scratch tiny model, "
                              "2e-4 for lora / qlora, 2e-5 for full fine-tuning of a pretrained model.", minimum=0.0)
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule.",
                                choices=["cosine", "linear", "constant", "constant_with_warmup"])
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up.", minimum=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", minimum=0.0)
    num_train_epochs: float = _f(1.0, "Epochs over the training split (ignored when max_steps > 0).",
                                 minimum=0.0)
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 = run the epochs.", minimum=-1)
    max_train_minutes: float = _f(0.0, "Stop training (checkpoint, merge, publish) after this many "
                                  "minutes; 0 = no limit.", minimum=0.0)
    time_schedule: bool = _f(False, "Run the learning-rate schedule (warm-up, decay) over max_train_minutes as well "
                             "as max_steps: its progress is the larger share, so it ends inside the time cap. Off: "
                             "the schedule follows the steps and the cap only stops training.")
    attempt_timeout: int = _f(0, "Seconds this attempt of the job may run before its platform stops it (a Cloud "
                              "Run task's timeout; rendered deployments set it from task_timeout). The job trains "
                              "until that minus a margin it measures, saves a checkpoint and exits 75 (more to do) "
                              "so the next attempt resumes; 0 = no limit.", minimum=0)
    train_batch_size: int = _f(8, "Per-device training batch size.", minimum=1)
    eval_batch_size: int = _f(8, "Per-device evaluation batch size.", minimum=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", minimum=1)
    gradient_checkpointing: bool = _f(False, "Recompute activations to save memory (slower).")
    max_seq_length: int = _f(512, "Longest example in tokens; longer examples are skipped and counted.",
                             minimum=16)
    batch_token_budget: int = _f(0, "Most tokens (rows x padded length) one forward and backward pass computes: a "
                                 "batch of longer rows runs as several passes over groups of its rows, with the "
                                 "same gradient, so memory stays bounded when schemas are long; 0 = whole batches.",
                                 minimum=0)
    shared_context_rows: int = _f(1, "Pack up to this many questions whose prompts start with the same context (one "
                                  "database, schema-first or chat) into a row, each seeing the context and itself "
                                  "only: the separate rows' loss, the context computed once. 1 = a row each.", minimum=1)
    logging_steps: int = _f(10, "Log one JSON line every N steps.", minimum=1)
    save_steps: int = _f(100, "Checkpoint every N steps.", minimum=1)
    save_total_limit: int = _f(2, "Checkpoints kept; older ones are pruned.", minimum=1)
    eval_generate_limit: int = _f(200, "Held-out examples to generate SQL for after training "
                                  "(exact match in the artifact); 0 = skip.", minimum=0)
    seed: int = _f(42, "Seed for sampling, splitting and training.")
    resume: str = _f("auto", "auto = newest complete checkpoint under the output, never, or a checkpoint path.")
    log_level: str = _f("info", "Log level.", choices=["debug", "info", "warning", "error"], group="common")

    # --- reinforcement from execution (--method grpo, docs/grpo.md) ---------------------------------
    grpo_policy: str = _f("lora", "What --method grpo trains: lora = LoRA adapters on top of the model (lora_r, "
                          "lora_alpha, target_modules; its reference for the KL term is the model without them), "
                          "full = every weight (a second copy serves as the reference when grpo_beta > 0).",
                          choices=["lora", "full"])
    grpo_num_generations: int = _f(8, "Completions sampled per question (the group whose rewards are compared); "
                                   "train_batch_size x gradient_accumulation_steps counts completions and must be "
                                   "a multiple of it.", minimum=2)
    grpo_temperature: float = _f(0.8, "Sampling temperature of the rollouts.", minimum=0.01)
    grpo_beta: float = _f(0.001, "Weight of the KL term that keeps the policy near where it started; 0 = none "
                          "(no reference forward pass).", minimum=0.0)
    grpo_loss_type: str = _f("dapo", "TRL's loss aggregation: dapo (tokens of the whole batch), grpo (per sequence), "
                             "dr_grpo (a constant), bnpo.", choices=["dapo", "grpo", "dr_grpo", "bnpo"])
    grpo_max_completion_length: int = _f(128, "Tokens sampled per completion at most.", minimum=8)
    grpo_rewards: list[str] = _f(["execution"], "Reward functions, each `name` or `name:weight`: execution (1 when "
                                 "the rows equal the gold query's, grpo_reward_runs when it runs, 0 otherwise), "
                                 "format (one statement, then end), schema (only the context's tables and columns).")
    grpo_reward_runs: float = _f(0.1, "Execution reward of a query that runs but returns other rows.", minimum=0.0,
                                 maximum=1.0)
    grpo_reward_timeout: float = _f(1.0, "Seconds one completion's query may run before it gets 0.", minimum=0.01)
    grpo_reward_row_cap: int = _f(1000, "Rows a completion's query may return; more gets 0.", minimum=1)
    grpo_reward_workers: int = _f(0, "Processes that execute the rewards; 0 = one per CPU core, at most 8.",
                                  minimum=0)
    grpo_vllm: str = _f("off", "Rollouts generated by vLLM on a GPU: colocate (in the training process), server "
                        "(`trl vllm-serve` at localhost:8000), off = transformers' generate.",
                        choices=["off", "colocate", "server"])

    # --- artifacts and buckets (models in buckets) -----------------------------------------------
    bucket_endpoint: str = _f("", "Endpoint of an S3-compatible store for s3:// URLs (MinIO, R2, Ceph); "
                              "default: AWS_ENDPOINT_URL, else AWS.", env=["AWS_ENDPOINT_URL"], group="buckets")
    transfer_workers: int = _f(16, "Files and byte ranges in flight at once when uploading to or "
                               "downloading from a bucket.", minimum=1, group="buckets")
    model_cache: str = _f("", "Local cache for models fetched from buckets and for bucket runs' staging; "
                          "default: $SQLTUNE_CACHE or ~/.cache/sqltune.", env=["SQLTUNE_CACHE"], group="buckets")
    # --- experiment tracking ----------------------------------------------------------------------
    report_to: str = _f("tensorboard", "Where training figures (the JSON log lines' loss, lr, grad norm, "
                        "tokens/s, ETA, at their step) and eval reports also go: none, tensorboard (written beside "
                        "the checkpoints), mlflow or wandb.", choices=["none", "tensorboard", "mlflow", "wandb"], group="tracking")
    run_id: str = _f("", "The run to log into: TensorBoard's log folder (default <output>/checkpoints/tensorboard), "
                     "or an MLflow / W&B run id (default: a new run; a resumed job continues its own). `sqltune eval` "
                     "logs its report only when this is given.", group="tracking")
    tracking_uri: str = _f("", "MLflow tracking URI (file:./mlruns, sqlite:///mlflow.db, http://host:5000); default "
                           "MLFLOW_TRACKING_URI, else MLflow's own.", env=["MLFLOW_TRACKING_URI"], group="tracking")
    tracking_experiment: str = _f("sqltune", "MLflow experiment / W&B project the runs go to.", group="tracking")
    # --- evaluation --------------------------------------------------------------------------
    eval_endpoint: str = _f("", "Evaluate a running server (sqltune, or any OpenAI-compatible one) at this "
                            "URL instead of a local model.", aliases=["--endpoint"], group="eval")
    eval_predictions: str = _f("", "Score predictions made elsewhere: JSON lines with `predicted` (or `sql`), "
                               "matched to the dataset by question and context, else by line order.",
                               aliases=["--predictions"], group="eval")
    eval_split: str = _f("all", "Examples of the dataset to evaluate: all, eval (the held-out share, split "
                         "by question hash as in training) or train.", choices=["all", "eval", "train"],
                         aliases=["--split"], group="eval")
    eval_limit: int = _f(-1, "Evaluate a seeded sample of this many examples; -1 = all.", minimum=-1,
                         aliases=["--limit"], group="eval")
    eval_output: str = _f("", "Folder or gs:// / s3:// URL for report.json, predictions.jsonl, summary.md and "
                          "ex_by_category.png; default reports/<model name>.", aliases=["--report-dir"], group="eval")
    eval_databases: int = _f(3, "Seeded databases each gold and predicted query run on (test-suite K).",
                             minimum=1, group="eval")
    eval_workers: int = _f(0, "Processes that score examples; 0 = one per CPU core.", minimum=0, group="eval")
    eval_query_timeout: float = _f(1.0, "Seconds one query may run in the SQLite sandbox before it is "
                                   "aborted as a timeout.", minimum=0.01, group="eval")
    eval_row_cap: int = _f(1000, "Rows a query may return before it counts as a row-limit error.", minimum=1, group="eval")
    eval_max_new_tokens: int = _f(128, "Tokens generated per question (greedy).", minimum=1, group="eval")
    eval_concurrency: int = _f(8, "Requests in flight at once against --endpoint.", minimum=1, group="eval")
    eval_retries: int = _f(3, "Retries of a request that fails with 5xx, 429 or a connection error.",
                           minimum=0, group="eval")
    eval_request_timeout: float = _f(120.0, "Seconds one request to --endpoint may take.", minimum=0.1,
                                     group="eval")
    eval_compare_unconstrained: bool = _f(False, "With --constrain: also generate unconstrained on the same rows, "
                                          "report both and print them side by side.",
                                          aliases=["--compare-unconstrained"], group="eval")
    eval_shard: str = _f("", "Score only shard i of n (`--shard 2/8`); default from CLOUD_RUN_TASK_INDEX "
                         "and CLOUD_RUN_TASK_COUNT when set. `sqltune eval merge` joins the shards.",
                         aliases=["--shard"], group="eval")
    # --- real databases (`sqltune ask`, `sqltune eval --database`) ----------------------------------
    database: str = _f("", "A real database to answer on: postgresql://user@host/db (password from the URL or "
                       "PGPASSWORD, never logged) or a SQLite file. Queries run read-only, one SELECT at a time.",
                       group="db")
    db_schema: str = _f("", "PostgreSQL schema whose tables are read; default: the connection's own (public).",
                        group="db")
    db_dialect: str = _f("sqlite", "SQL dialect the model writes (sql-create-context is SQLite-like); its SQL is "
                         "transpiled to the database's dialect with sqlglot.",
                         choices=["sqlite", "postgres", "mysql", "duckdb", "bigquery", "snowflake", "tsql"], group="db")
    db_timeout: float = _f(10.0, "Seconds one query may run on the database (PostgreSQL statement_timeout, "
                           "SQLite's progress handler) before it is stopped.", minimum=0.01, group="db")
    db_row_cap: int = _f(1000, "Rows `sqltune ask` fetches at most; more are cut and the output says so.",
                         minimum=1, group="db")
    db_keys: bool = _f(True, "Write primary and foreign keys into the CREATE TABLE context (sql-create-context "
                       "has none; --no-db-keys gives such a model the bare columns it was trained on).", group="db")
    db_context_chars: int = _f(6000, "Longest schema context (CREATE TABLE text) given to the model; a larger "
                               "database gets the tables the question names, and their foreign-key neighbours.",
                               minimum=200, group="db")
    # --- serving -----------------------------------------------------------------------------
    constrain: str = _f("off", "Schema-constrained decoding (a grammar built from each request's CREATE TABLE "
                        "context, compiled by xgrammar): schema = only the context's tables and columns; "
                        "schema+values = also string and number literals copied from the question; off = free. "
                        "In serve, the default of /v1/sql (requests may set `constrain`).",
                        choices=["off", "schema", "schema+values"], group="serve")
    candidates: int = _f(1, "Answers per question (the greedy one plus candidates-1 samples); each runs read-only (on "
                         "databases synthesised from the schema and question, or on --database) and the answer whose "
                         "result most share is returned; 1 = the greedy answer. Serve: /v1/sql and /predict's default.",
                         minimum=1, maximum=16, group="serve")
    candidate_temperature: float = _f(0.8, "Sampling temperature of the candidates after the first (--candidates).",
                                      minimum=0.01, maximum=2.0, group="serve")
    complete_joins: bool = _f(True, "A column taken from a table without it comes from the nearest table with it, joined "
                              "along the context's foreign keys (eval, ask, serve, held-out check).", group="serve")
    candidate_top_p: float = _f(0.95, "Nucleus (top-p) share the candidates after the first sample from.",
                                minimum=0.01, maximum=1.0, group="serve")
    api_key: str = _f("", "Bearer key required on every route but /health, /ready and the page /.", group="serve")
    # choices: sqltune.engines.factory.ENGINES (checked there; the flags read them from there)
    serve_engine: str = _f("auto", "Generation engine; auto = vllm when CUDA and vllm are installed, else "
                           "transformers; llamacpp = llama.cpp on the model's GGUF (xllamacpp).",
                           aliases=["--engine"], group="serve")
    gguf_quant: str = _f("q8_0", "--engine llamacpp on a model folder: the GGUF weight type it is exported to "
                         "once (into the model cache).", choices=["f16", "q8_0", "q4_k_m"], group="serve")
    serve_host: str = _f("127.0.0.1", "Address to listen on; the default keeps the server local, 0.0.0.0 "
                         "listens on every interface (the container image and the manifests set it).",
                         aliases=["--host"], group="serve")
    serve_port: int = _f(8000, "Port to listen on (Cloud Run and Vertex AI set PORT / AIP_HTTP_PORT).",
                         minimum=1, aliases=["--port"], env=["PORT", "AIP_HTTP_PORT"], group="serve")
    served_model_name: str = _f("", "Model id in the API; default: the artifact's new_model.", group="serve")
    serve_device: str = _f("auto", "Device for the transformers engine; auto = cuda when available.",
                           choices=["auto", "cpu", "cuda"], group="serve")
    max_queue: int = _f(64, "Requests that may wait beyond those being generated; more get 429 with "
                        "Retry-After.", minimum=0, group="serve")
    max_batch_size: int = _f(16, "Sequences generated together (vLLM: max_num_seqs).", minimum=1, group="serve")
    batch_wait_ms: float = _f(5.0, "How long the transformers engine waits for more requests to batch.",
                              minimum=0.0, group="serve")
    request_timeout: float = _f(120.0, "Seconds a request may take, queueing included; then 504.",
                                minimum=0.1, group="serve")
    max_body_bytes: int = _f(1_000_000, "Largest request body; larger ones get 413.", minimum=1024,
                             group="serve")
    body_timeout: float = _f(10.0, "Seconds a client may pause while sending its request body (one shorter "
                             "than its Content-Length); then 408.", minimum=0.1, group="serve")
    default_max_tokens: int = _f(128, "max_tokens when a request does not set it.", minimum=1, group="serve")
    max_tokens_limit: int = _f(1024, "Largest max_tokens a request may ask for.", minimum=1, group="serve")
    max_model_len: int = _f(0, "Context length (prompt + completion); 0 = the model's own.", minimum=0,
                            group="serve")
    gpu_memory_utilization: float = _f(0.9, "Share of GPU memory vLLM may use.", minimum=0.01, group="serve")
    tensor_parallel_size: int = _f(1, "GPUs one vLLM model is split across.", minimum=1, group="serve")
    safetensors_load_strategy: str = _f("lazy", "lazy = memory-map weights; eager = read each file whole "
                                        "first (much faster on gcsfuse and other network mounts).",
                                        choices=["lazy", "eager"], group="serve")
    shutdown_grace: float = _f(20.0, "Seconds in-flight requests get to finish after SIGTERM.", minimum=0.0,
                               group="serve")
    vllm_enforce_eager: bool = _f(False, "vLLM: skip graph capture and compilation (faster start, slower "
                                  "decoding).", group="serve")
    vllm_log_stats: bool = _f(False, "vLLM: record engine stats each step (fills the batch-size histogram; "
                              "costs some throughput).", group="serve")
    predict_route: str = _f("/predict", "Extra path for /predict (Vertex AI sets AIP_PREDICT_ROUTE).",
                            env=["AIP_PREDICT_ROUTE"], group="serve")
    health_route: str = _f("/ready", "Extra path for /ready (Vertex AI sets AIP_HEALTH_ROUTE).",
                           env=["AIP_HEALTH_ROUTE"], group="serve")
    # --- deployment --------------------------------------------------------------------------
    gcp_project: str = _f("", "Google Cloud project for `sqltune deploy cloudrun` and image paths.",
                          aliases=["--project"], env=["GOOGLE_CLOUD_PROJECT"], group="deploy")
    gcp_region: str = _f("", "Region of the Cloud Run job, service, bucket and Artifact Registry "
                         "(e.g. us-central1, which has L4 GPUs).", aliases=["--region"], group="deploy")
    deploy_bucket: str = _f("", "Bucket the job publishes the model to and the service loads it from; "
                            "default <project>-sqltune-models.", group="deploy")
    bucket_mode: str = _f("gs", "How the containers reach the bucket: gs (gs:// URLs, atomic publish) or "
                          "gcsfuse (the bucket mounted as a volume at /mnt/models).",
                          choices=["gs", "gcsfuse"], group="deploy")
    gpu_type: str = _f("nvidia-l4", "GPU type of the job and service (Cloud Run accelerator / GKE node label value).",
                       group="deploy")
    gpu_count: int = _f(1, "GPUs per container; 0 = CPU only. Above 1 (Kubernetes only) the job runs "
                        "torchrun with one process per GPU.", minimum=0, group="deploy")
    deploy_cpu: int = _f(8, "vCPUs per container (an L4 needs at least 4).", minimum=1, group="deploy")
    deploy_memory: str = _f("32Gi", "Memory per container, e.g. 32Gi (an L4 needs at least 16Gi).",
                            group="deploy")
    job_max_retries: int = _f(3, "Retries of a fine-tuning task (Cloud Run maxRetries, at most 10; Kubernetes "
                              "backoffLimit): each attempt resumes from the newest checkpoint in the bucket, so "
                              "retries + 1 attempts of task_timeout each can train a long run.", minimum=0,
                              group="deploy")
    task_timeout: int = _f(3600, "Seconds one attempt of a job task may run (Cloud Run caps GPU tasks at 3600); "
                           "the fine-tuning container gets it as attempt_timeout.", minimum=1, group="deploy")
    plan_tokens_per_second: float = _f(0.0, "Training throughput the deployment plan assumes, in tokens per "
                                       "second; 0 = sqltune's figure for the GPU type (nvidia-l4: 2500, a 2B "
                                       "model with QLoRA).", minimum=0.0, group="deploy")
    job_task_count: int = _f(1, "Tasks of the sharded evaluation job (each gets CLOUD_RUN_TASK_INDEX).",
                             minimum=1, group="deploy")
    job_parallelism: int = _f(1, "Evaluation tasks that run at once.", minimum=1, group="deploy")
    image_registry: str = _f("", "Registry prefix of the images; default "
                             "<region>-docker.pkg.dev/<project>/<image_repo>, or bare local names "
                             "without a project.", group="deploy")
    image_repo: str = _f("sqltune", "Artifact Registry repository that holds the images.", group="deploy")
    image_tag: str = _f("", "Tag of both images; default the sqltune version.", group="deploy")
    deploy_service_account: str = _f("sqltune-runner", "Service account (name before the @) the job "
                                     "and service run as; also the Kubernetes ServiceAccount.",
                                     group="deploy")
    hf_token_secret: str = _f("HF_TOKEN", "Secret Manager secret (Kubernetes Secret, lower-cased) that "
                              "holds the Hugging Face token.", group="deploy")
    vpc_egress: str = _f("off", "Direct VPC egress of the job and service: off, private-ranges-only "
                         "or all-traffic (faster bucket transfers through Private Google Access).",
                         choices=["off", "private-ranges-only", "all-traffic"], group="deploy")
    vpc_network: str = _f("default", "VPC network for Direct VPC egress.", group="deploy")
    vpc_subnet: str = _f("default", "Subnet for Direct VPC egress.", group="deploy")
    min_instances: int = _f(0, "Serving instances kept warm (Kubernetes replicas: at least 1).",
                            minimum=0, group="deploy")
    max_instances: int = _f(1, "Most serving instances (bounded by your GPU quota).", minimum=1,
                            group="deploy")
    container_concurrency: int = _f(8, "Requests one serving instance takes at once (the engine "
                                    "batches them).", minimum=1, group="deploy")
    deploy_job_name: str = _f("sqltune-finetune", "Name of the fine-tuning job (the evaluation job "
                              "adds -eval).", group="deploy")
    deploy_service_name: str = _f("sqltune-serve", "Name of the serving service.", group="deploy")
    k8s_namespace: str = _f("default", "Kubernetes namespace of the rendered objects.", group="deploy")
    k8s_accelerator_label: str = _f("cloud.google.com/gke-accelerator", "Node label that selects the "
                                    "GPU type on Kubernetes; empty = no node selector.", group="deploy")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))

    @property
    def output_dir(self) -> str:
        return self.output or f"models/{self.new_model}"

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if redact:
            for name in SECRET_FIELDS:
                data[name] = "***" if data.get(name) else ""
            data["database"] = redact_url(data["database"])
        return data


def redact_url(url: str) -> str:
    """A database URL without its password (postgresql://ann:***@host/db), for logs, reports and config show."""
    return re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", url)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# The reference tutorial's Cloud Run Job variables keep their bare names; every other field is read only
# by its SQLTUNE_ name, so an unrelated SEED or OUTPUT in a user's shell cannot change a run.
TUTORIAL_ENV = frozenset({"model_name", "new_model", "lora_r", "lora_alpha", "gradient_accumulation_steps",
                          "dataset_limit", "logging_steps", "max_seq_length", "train_batch_size", "eval_batch_size"})


def env_names(name: str) -> tuple[str, ...]:
    """Every variable that sets field `name`, in precedence order (the SQLTUNE_ name wins)."""
    bare = (name.upper(),) if name in TUTORIAL_ENV else ()
    return (ENV_PREFIX + name.upper(), *bare, *FIELDS[name].metadata["env"])


def env_name(name: str) -> str:
    """The variable sqltune writes for field `name` (manifests, help): the tutorial's bare name where it has one."""
    return name.upper() if name in TUTORIAL_ENV else ENV_PREFIX + name.upper()


def _check(f: dataclasses.Field[Any], value: Any) -> None:
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{flag_name(f.name)}: {value!r} is not allowed",
                          f"use one of: {', '.join(meta['choices'])}")
    if meta["minimum"] is not None and isinstance(value, (int, float)) and value < meta["minimum"]:
        raise ConfigError(f"{flag_name(f.name)}: {value!r} is below the minimum {meta['minimum']}",
                          f"set {flag_name(f.name)} to {meta['minimum']} or more")
    if meta["maximum"] is not None and isinstance(value, (int, float)) and value > meta["maximum"]:
        raise ConfigError(f"{flag_name(f.name)}: {value!r} is above the maximum {meta['maximum']}",
                          f"set {flag_name(f.name)} to {meta['maximum']} or less")


MAX_INT = 2**53  # every integer below it is exact as a float and a JSON number


def parse_value(name: str, raw: Any, origin: str) -> Any:
    """Convert a YAML, env or flag value to the field's type, or fail naming the flag."""
    kind = _TYPES[name]
    where = f"{origin} {flag_name(name)}" if origin == "flag" else f"{origin} value for {name}"
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            number = int(raw)
            if abs(number) > MAX_INT:  # 1e23 steps is a typo; torch and JSON lose such integers anyway
                raise ConfigError(f"{where}: {raw!r} is out of range (at most {MAX_INT:,})",
                                  f"pass {flag_name(name)} {_example(name)}")
            return number
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):  # inf / nan would train to NaN weights, or never stop
                raise ValueError
            return value
        if name == "dataset" and isinstance(raw, list):  # several sources as a YAML list
            raw = ",".join(str(i).strip() for i in raw)
        if kind == list[str]:
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return [str(i).strip() for i in items if str(i).strip()]
        if raw is None or isinstance(raw, (dict, list)):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a finite number"}.get(kind, "a string")
        if kind == list[str]:
            expected = "a list or comma-separated string"
        raise ConfigError(f"{where}: {raw!r} is not {expected}",
                          f"pass {flag_name(name)} {_example(name)}") from None


def _example(name: str) -> str:
    default = FIELDS[name].default
    if default is dataclasses.MISSING:
        return ",".join(FIELDS[name].default_factory())  # type: ignore[misc]
    return str(default).lower() if isinstance(default, bool) else str(default) or "VALUE"


def _unique_key_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load, except that a key given twice is an error (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key `{key}` appears twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    _UniqueKeyLoader = _unique_key_loader()  # noqa: N806 - a class

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", "pass --config with a path to a YAML file")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start})",
                          "save the YAML file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of field: value", "see configs/tiny-cpu.yaml")
    for key in data:
        if key not in FIELDS:
            near = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f"did you mean `{near[0]}`?" if near else "run `sqltune config show` to list the fields"
            raise ConfigError(f"config file {p}: unknown key `{key}`", hint)
    return data


def resolve(yaml_path: str | None, environ: Mapping[str, str], flags: Mapping[str, Any]) -> tuple[Config, dict[str, str]]:
    """Merge the layers; return the Config and, for each field not at its default, where it came from."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if yaml_path:
        for key, raw in read_yaml(yaml_path).items():
            values[key], sources[key] = parse_value(key, raw, "config"), f"config {yaml_path}"
    for name in FIELDS:
        for env in env_names(name):
            if env in environ:
                values[name], sources[name] = parse_value(name, environ[env], f"env {env}"), f"env {env}"
                break
    for name, raw in flags.items():
        values[name], sources[name] = parse_value(name, raw, "flag"), f"flag {flag_name(name)}"
    return Config(**values), sources


def add_arguments(parser: argparse.ArgumentParser, groups: Sequence[str] | None = None,
                  fields: Mapping[str, str] | None = None, aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add `--config` and one flag per field of `groups`, plus the named `fields` from other groups (each
    with the command's own help text, "" for the schema's). Flags default to SUPPRESS so only given ones count."""
    fields = dict(fields or {})
    aliases = aliases or {}
    parser.add_argument("--config", "-c", default=argparse.SUPPRESS, metavar="YAML",
                        help="YAML file of config fields (see configs/).")
    sections: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        group = f.metadata["group"]
        if groups is not None and group not in groups and group != "common" and name not in fields:
            continue
        if name in fields:
            group = "command"
        section = sections.setdefault(group, parser.add_argument_group(f"{group} options"))
        kind = _TYPES[name]
        env = env_name(name)
        # argparse %-formats help: a field's text is prose, so a "%" in it is a percent sign
        help_text = f"{fields.get(name) or f.metadata['help']} [env {env}]".replace("%", "%%")
        names = [flag_name(name), *f.metadata["aliases"], *aliases.get(name, ())]
        if kind is bool:
            section.add_argument(*names, dest=name, default=argparse.SUPPRESS,
                                 action=argparse.BooleanOptionalAction, help=help_text)
        else:  # a repeated --dataset adds a source (joined in from_namespace), never keeps the last one alone
            section.add_argument(*names, dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
                                 choices=f.metadata["choices"], help=help_text,
                                 action="append" if name == "dataset" else "store")


def from_namespace(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    flags = {k: ",".join(v) if k == "dataset" else v for k, v in vars(ns).items() if k in FIELDS}
    return resolve(getattr(ns, "config", None), os.environ if environ is None else environ, flags)


# what a model's contexts were built with: the schema budget, and whether keys were written into them
AS_TRAINED = ("db_context_chars", "db_keys")


def as_trained(cfg: Config, sources: Mapping[str, str], trained: Mapping[str, Any],
               names: Sequence[str] = AS_TRAINED) -> Config:
    """`cfg` with the fields `names` taken from a model's training config (`config` in its sqltune.json) where
    the user did not set them (`sources`): a model is asked, evaluated and trained further on contexts like
    those it learnt on (`db_context_chars`: the schema budget of each context; `db_keys`: keys or bare columns)."""
    updates = {}
    for name in names:
        value = trained.get(name)
        default = getattr(cfg, name)
        if name not in sources and value is not None and type(value) is type(default):
            updates[name] = value
    return dataclasses.replace(cfg, **updates) if updates else cfg


def load(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Config, dict[str, str]]:
    """Resolve a Config from command-line arguments and an environment, without touching the process."""
    parser = argparse.ArgumentParser(prog="sqltune", exit_on_error=False)
    add_arguments(parser)
    try:
        ns = parser.parse_args(list(argv))
    except argparse.ArgumentError as e:
        raise ConfigError(str(e), "run `sqltune finetune --help` for the flags") from None
    return from_namespace(ns, environ)


def render(cfg: Config, sources: Mapping[str, str]) -> str:
    """The resolved config as YAML, each non-default value annotated with where it came from."""
    lines = []
    for name, value in cfg.to_dict().items():
        shown = ", ".join(value) if isinstance(value, list) else value
        shown = f'"{shown}"' if isinstance(shown, str) and (shown == "" or ":" in shown) else shown
        shown = str(shown).lower() if isinstance(shown, bool) else shown
        note = f"  # {sources[name]}" if name in sources else ""
        lines.append(f"{name}: {shown}{note}")
    token = "set (hidden)" if os.environ.get("HF_TOKEN") else "not set"
    lines.append(f"# HF_TOKEN: {token}")
    return "\n".join(lines)
