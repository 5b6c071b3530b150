"""`sqltune finetune --method grpo`: execution rewards on real SQLite files and synthesised databases, their limits,
and GRPO runs of the tiny model that publish, and resume after a kill."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, log_events, run_sqltune, sqltune_cmd

from sqltune.config import Config, load
from sqltune.errors import ConfigError, DataError
from sqltune.finetune import grpo, rewards
from sqltune.prompts import DEFAULT_TEMPLATE, extract_sql

SPIDER = ROOT.parent / "shared" / "data" / "spider-train"
CONTEXT = ("CREATE TABLE singer (id INTEGER, name TEXT, country TEXT, age INTEGER); "
           "CREATE TABLE concert (id INTEGER, singer_id INTEGER, year INTEGER)")
GOLD = "SELECT name FROM singer WHERE age > 40 ORDER BY age"


def _extract(text: str) -> str:
    return extract_sql(text, "</s>", DEFAULT_TEMPLATE)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real SQLite file: 3000 singers (enough for a 4-way cross join to run for hours), 50 concerts."""
    path = tmp_path_factory.mktemp("db") / "concerts.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER)")
    conn.execute("CREATE TABLE concert (id INTEGER PRIMARY KEY, singer_id INTEGER, year INTEGER)")
    conn.executemany("INSERT INTO singer VALUES (?, ?, ?, ?)",
                     [(i, f"singer {i}", ("France", "Peru", "Japan")[i % 3], 18 + i % 40) for i in range(3000)])
    conn.executemany("INSERT INTO concert VALUES (?, ?, ?)", [(i, i * 7, 2000 + i % 20) for i in range(50)])
    conn.commit()
    conn.close()
    return str(path)


@pytest.fixture(scope="module")
def scorer() -> rewards.Scorer:
    s = rewards.Scorer(rewards.Limits(timeout_s=0.5, row_cap=5000), workers=2)
    yield s
    s.close()


def _execution(scorer: rewards.Scorer, completions: list[str], database: str, gold: str = GOLD) -> list[float | None]:
    reward = rewards.ExecutionReward(scorer, runs=0.1, extract=_extract)
    n = len(completions)
    logged: dict[str, float] = {}
    out = reward(prompts=["p"] * n, completions=completions, gold=[gold] * n, context=[CONTEXT] * n,
                 database=[database] * n, question=["Who is older than 40?"] * n,
                 log_metric=lambda name, value: logged.__setitem__(name, value))
    assert set(logged) >= {"execution/ex", "execution/timeouts"}
    return out


def test_correct_runnable_and_broken_sql_on_a_real_database(scorer: rewards.Scorer, shop: str) -> None:
    completions = [" SELECT name FROM singer WHERE age > 40 ORDER BY age</s>",
                   " SELECT name FROM singer WHERE age > 39 ORDER BY age",   # runs, other rows
                   " SELECT name FROM singer WHERE age > 40",                  # the gold orders its rows: wrong
                   " SELECT nme FROM singer WHERE age > 40",                   # no such column
                   " SELEC name FRM singer",
                   " DELETE FROM singer"]                                      # refused, never run
    assert _execution(scorer, completions, shop) == [1.0, 0.1, 0.1, 0.0, 0.0, 0.0]
    with sqlite3.connect(shop) as conn:
        assert conn.execute("SELECT count(*) FROM singer").fetchone() == (3000,)


def test_same_rows_in_another_column_order_count_as_correct(scorer: rewards.Scorer, shop: str) -> None:
    gold = "SELECT name, age FROM singer WHERE id < 5"
    assert _execution(scorer, [" SELECT age, name FROM singer WHERE id < 5"], shop, gold) == [1.0]


def test_runaway_queries_cost_their_budget_and_score_zero(scorer: rewards.Scorer, shop: str) -> None:
    cross = " SELECT count(*) FROM singer a, singer b, singer c, singer d"
    recursive = " WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    huge = " SELECT a.name FROM singer a, singer b"  # 9 million rows: past the row cap
    correct = " SELECT name FROM singer WHERE age > 40 ORDER BY age"
    tasks = [rewards.Task(_extract(c), GOLD, CONTEXT, shop) for c in (cross, recursive, huge, correct)]
    outcomes = scorer.score(tasks)
    assert [o.error_kind for o in outcomes] == ["timeout", "timeout", "row_limit", ""]
    assert outcomes[0].timed_out and outcomes[1].timed_out
    # the sandbox stopped them, not the backstop: the batch went on and the correct one still scores 1
    assert _execution(scorer, [cross, recursive, huge, correct], shop) == [0.0, 0.0, 0.0, 1.0]


def test_synthesised_databases_when_a_row_has_none(scorer: rewards.Scorer) -> None:
    completions = [" SELECT name FROM singer WHERE age > 40 ORDER BY age",
                   " SELECT country FROM singer WHERE age > 40 ORDER BY age",
                   " SELECT name FROM singers"]
    assert _execution(scorer, completions, "") == [1.0, 0.1, 0.0]


def test_a_row_whose_gold_fails_teaches_nothing(scorer: rewards.Scorer, shop: str) -> None:
    assert _execution(scorer, [" SELECT name FROM singer"], shop, gold="SELECT x FROM nowhere") == [None]


def test_format_and_schema_rewards() -> None:
    fmt = rewards.FormatReward([2], _extract)
    texts = [" SELECT name FROM singer;", " SELECT name FROM singer", " SELECT 1; SELECT 2",
             " SELECT name FROM singer\n\nQuestion: more"]
    ids = [[5, 6, 2], [5, 6, 7], [5, 2], [5, 6, 2]]
    assert fmt(prompts=["p"] * 4, completions=texts, completion_ids=ids) == [1.0, 0.0, 0.0, 0.0]
    schema = rewards.SchemaReward(_extract)
    texts = [" SELECT name FROM singer", " SELECT title FROM singer", " SELECT * FROM album", " DROP TABLE singer"]
    assert schema(prompts=["p"] * 4, completions=texts, context=[CONTEXT] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_reward_names_weights_and_batches_are_checked_at_start() -> None:
    assert rewards.parse_rewards(["execution", "format:0.2"]) == [("execution", 1.0), ("format", 0.2)]
    for bad in (["exec"], ["format:lots"], ["execution", "execution:2"], []):
        with pytest.raises(ConfigError):
            rewards.parse_rewards(bad)
    cfg, _ = load(["--method", "grpo", "--model", "models/x", "--train-batch-size", "6"], {})
    with pytest.raises(ConfigError, match="grpo-num-generations"):
        grpo.check_config(cfg)
    with pytest.raises(ConfigError, match="random weights"):
        grpo.check_config(Config(method="grpo", model_name="tiny"))
    with pytest.raises(ConfigError):
        load(["--grpo-policy", "qlora"], {})
    recipe, _ = load(["--config", str(ROOT / "configs" / "smollm2-135m-grpo-cpu.yaml")], {})
    grpo.check_config(recipe)
    assert recipe.method == "grpo" and recipe.dataset.startswith("spider:")


def test_missing_databases_are_refused_at_start(tmp_path: Path, shop: str) -> None:
    from sqltune.data.loading import Example

    rows = [Example("q", CONTEXT, GOLD, "shop", shop), Example("q", CONTEXT, GOLD)]
    assert grpo.check_databases(rows) == 1
    with pytest.raises(DataError, match="do not exist"):
        grpo.check_databases([*rows, Example("q", CONTEXT, GOLD, "gone", str(tmp_path / "gone.sqlite"))])


def test_spider_gold_queries_score_one_on_their_databases(scorer: rewards.Scorer) -> None:
    if not (SPIDER / "train_spider.json").is_file():
        pytest.skip("../shared/data/spider-train is not present")
    rows = json.loads((SPIDER / "train_spider.json").read_text())[:400:40]
    tasks = [rewards.Task(r["query"], r["query"], "", str(SPIDER / "database" / r["db_id"] / f"{r['db_id']}.sqlite"))
             for r in rows]
    outcomes = scorer.score(tasks)
    assert all(o.ex for o in outcomes), [(t.gold, o) for t, o in zip(tasks, outcomes, strict=True) if not o.ex]
    wrong = scorer.score([rewards.Task("SELECT 1", t.gold, "", t.database) for t in tasks])
    assert not any(o.ex for o in wrong)


GRPO = ["--method", "grpo", "--dataset", "synthetic:200", "--train-batch-size", "8", "--grpo-num-generations", "4",
        "--grpo-max-completion-length", "40", "--grpo-reward-workers", "2", "--logging-steps", "1",
        "--report-to", "none", "--learning-rate", "0.0005"]


@pytest.mark.slow
def test_grpo_steps_publish_a_model_that_serves(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    proc = run_sqltune("finetune", *GRPO, "--model", str(tiny_model_dir), "--grpo-policy", "lora", "--max-steps", "3",
                       "--save-steps", "100", "--eval-generate-limit", "4",
                       "--grpo-rewards", "execution,format:0.2,schema:0.2", "--output", str(out))
    steps = log_events(proc.stderr, "train step", prefix=False)
    assert [e["step"] for e in steps] == [1, 2, 3]
    for e in steps:
        assert {"reward", "reward_std", "zero_std_groups", "completion_length", "generation_s", "reward_s",
                "update_s", "reward_format", "reward_schema", "reward_execution"} <= set(e), e
        assert 0.0 <= e["reward"] <= 1.4 and 0.0 <= e["zero_std_groups"] <= 1.0
    from sqltune.artifacts import manifests

    manifests.verify(out)
    meta = manifests.read_meta(out)
    assert meta["config"]["method"] == "grpo" and meta["metrics"]["steps"] == 3
    assert [h["step"] for h in meta["metrics"]["reward_history"]] == [1, 2, 3]
    assert meta["prompt_template"] == manifests.read_meta(tiny_model_dir)["prompt_template"]
    from sqltune.engines import batch

    with batch.open_model(str(out), engine="transformers") as llm:
        [sql] = llm.generate_sql([("How many employees are older than 30?",
                                   "CREATE TABLE employees (name VARCHAR, age INTEGER)")])
    assert sql.upper().startswith("SELECT")


@pytest.mark.slow
def test_killed_grpo_run_resumes_its_step_count_and_publishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = ["finetune", *GRPO, "--model", str(tiny_model_dir), "--grpo-policy", "full", "--grpo-beta", "0.01",
            "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "3", "--eval-generate-limit", "0",
            "--output", str(out)]
    proc = subprocess.Popen(sqltune_cmd(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "checkpoints" / "checkpoint-2" / "manifest.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: the worker pool dies with it
    proc.wait()
    assert manifest.exists()
    assert not (out / "manifest.json").exists()

    resumed = run_sqltune(*args)
    assert log_events(resumed.stderr, "resuming")
    steps = [e["step"] for e in log_events(resumed.stderr, "train step", prefix=False)]
    assert steps and steps[0] > 2 and steps[-1] == 6, steps
    from sqltune.artifacts import manifests

    manifests.verify(out)
    assert manifests.read_meta(out)["metrics"]["steps"] == 6
