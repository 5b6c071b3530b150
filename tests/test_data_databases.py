"""Rows on real databases: the Spider / BIRD layout, your own database's question / SQL pairs, the split by
database, the one context selection, and EX on each row's own database.

    pytest tests/test_data_databases.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_db import READER, READER_PASS, SHOP_DDL, cli, pg_server_fixture, seed_sqlite  # noqa: F401

from sqltune.data import databases, loading
from sqltune.db import introspect
from sqltune.db.connect import connect
from sqltune.errors import DataError
from sqltune.evaluate.hardness import hardness
from sqltune.evaluate.row_databases import RowDatabases
from sqltune.evaluate.score import Item

SPIDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "spider-train"
PEOPLE_DDL = [
    "CREATE TABLE people (person_id INTEGER PRIMARY KEY, first_name VARCHAR(20), last_name VARCHAR(20))",
    "CREATE TABLE candidates (candidate_id INTEGER PRIMARY KEY REFERENCES people (person_id), votes INTEGER)",
]
PEOPLE_ROWS = {"people": [(1, "Ann", "Lee"), (2, "Bob", "Ray"), (3, "Cleo", "Fox")],
               "candidates": [(1, 40), (3, 12)]}
JOIN_GOLD = "SELECT T2.first_name FROM candidates AS T1 JOIN people AS T2 ON T1.candidate_id = T2.person_id"


def _layout(root: Path, extra_rows: list[dict] | None = None) -> Path:
    """A Spider-layout folder: two real databases, one database known only from tables.json."""
    for name, ddl, rows in (("shop", SHOP_DDL, None), ("election", PEOPLE_DDL, PEOPLE_ROWS)):
        (root / "database" / name).mkdir(parents=True)
        seed_sqlite(root / "database" / name / f"{name}.sqlite", ddl, **({"rows": rows} if rows else {}))
    tables = [{"db_id": "ghost", "table_names_original": ["ship", "port"],
               "column_names_original": [[-1, "*"], [0, "ship_id"], [0, "name"], [0, "port_id"], [1, "port_id"],
                                         [1, "city"]],
               "column_types": ["text", "number", "text", "number", "number", "text"],
               "primary_keys": [1, 4], "foreign_keys": [[3, 4]]}]
    (root / "tables.json").write_text(json.dumps(tables))
    questions = [
        {"db_id": "shop", "question": "How many customers live in Oslo?",
         "query": "SELECT count(*) FROM customers WHERE city = 'Oslo'"},
        {"db_id": "shop", "question": "Which customers have shipped orders?",
         "query": "SELECT DISTINCT T1.name FROM customers AS T1 JOIN orders AS T2 ON T1.id = T2.customer_id "
                  "WHERE T2.status = 'shipped'"},
        {"db_id": "shop", "question": "What is in the missing table?", "query": "SELECT * FROM warehouse"},
        {"db_id": "election", "question": "What are the first names of all candidates?", "query": JOIN_GOLD,
         "question_syn": "What are the forenames of all candidates?"},
        {"db_id": "ghost", "question": "Which ships are in Lima?",
         "query": "SELECT T1.name FROM ship AS T1 JOIN port AS T2 ON T1.port_id = T2.port_id WHERE T2.city = 'Lima'"},
        {"db_id": "nowhere", "question": "Anything?", "query": "SELECT 1"},
        *(extra_rows or []),
    ]
    (root / "train_spider.json").write_text(json.dumps(questions))
    return root


def test_the_layout_reads_contexts_from_each_database_and_counts_what_it_skips(tmp_path: Path) -> None:
    root = _layout(tmp_path / "spider", extra_rows=[{"db_id": "shop", "question": ""}])
    rows, report = databases.read_layout(f"spider:{root}", context_chars=6000, question_syn=True)
    by_q = {ex.question: ex for ex in rows}
    shop = by_q["How many customers live in Oslo?"]
    # the context is what ask's introspection writes, keys included, read from the file itself
    db = connect(str(root / "database" / "shop" / "shop.sqlite"))
    assert shop.context == introspect.introspect(db).context()
    db.close()
    assert "FOREIGN KEY (customer_id) REFERENCES customers (id)" in shop.context
    assert shop.database.endswith("shop.sqlite") and shop.db_id == "shop"
    # the gold query that fails on its database is skipped and counted, with the reason
    assert "What is in the missing table?" not in by_q
    assert report.gold_failed == {"shop": 1} and "warehouse" in report.gold_failed_examples[0]["error"]
    # a database without a file: its DDL built from tables.json, with its keys, and counted
    ghost = by_q["Which ships are in Lima?"]
    assert ghost.database == "" and report.no_database == 1
    assert ghost.context == ("CREATE TABLE ship (ship_id INTEGER, name VARCHAR, port_id INTEGER, PRIMARY KEY (ship_id), "
                             "FOREIGN KEY (port_id) REFERENCES port (port_id)); CREATE TABLE port (port_id INTEGER, "
                             "city VARCHAR, PRIMARY KEY (port_id))")
    assert "What are the forenames of all candidates?" in by_q  # Spider-Syn's rewrite, same gold
    assert report.rows == {"shop": 2, "election": 1, "ghost": 1}


def test_a_folder_that_is_not_the_layout_and_a_broken_tables_json_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not in the Spider / BIRD layout"):
        loading.load_splits(f"spider:{tmp_path / 'empty'}")
    root = _layout(tmp_path / "spider")
    (root / "tables.json").write_text("{not json")
    with pytest.raises(DataError, match="tables.json does not parse"):
        loading.load_splits(f"spider:{root}")
    code, _, err = cli("data", "check", "--dataset", f"spider:{root}")
    assert code == 2 and "tables.json does not parse" in err and "Traceback" not in err


def test_the_split_is_by_database_and_held_out_questions_never_train_another_source(tmp_path: Path) -> None:
    root = _layout(tmp_path / "spider")
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What are the first names of all candidates?", "context": "CREATE TABLE candidates (id INTEGER)",
         "answer": "SELECT id FROM candidates"},
        {"question": "How many heads are there?", "context": "CREATE TABLE head (age INTEGER)",
         "answer": "SELECT count(*) FROM head"}]) + "\n")
    splits = loading.load_splits(f"{other},spider:{root}*2", eval_fraction=0.0,
                                 db=loading.DatabaseOptions(held_out=("election",)))
    train_dbs = {ex.db_id for ex in splits.train if ex.db_id}
    eval_dbs = {ex.db_id for ex in splits.eval if ex.db_id}
    assert eval_dbs == {"election"} and "election" not in train_dbs and train_dbs == {"shop", "ghost"}
    # the other source's copy of a held-out question is dropped from training, and counted
    assert "What are the first names of all candidates?" not in {ex.question for ex in splits.train}
    assert splits.report.leaked_dropped == 1
    # weight 2: every training row of the layout twice
    assert sum(1 for ex in splits.train if ex.db_id == "shop") == 4
    assert [s["source"] for s in splits.report.sources] == [str(other), f"spider:{root}"]


@pytest.mark.skipif(not SPIDER.is_dir(), reason="../shared/data/spider-train is not here")
def test_spider_train_holds_out_fixed_databases_never_seen_in_training() -> None:
    splits = loading.load_splits(f"spider:{SPIDER}", db=loading.DatabaseOptions(context_chars=2000))
    assert set(splits.report.held_out_databases) == set(databases.SPIDER_TRAIN_HELD_OUT)
    assert not {ex.db_id for ex in splits.train} & set(databases.SPIDER_TRAIN_HELD_OUT)
    assert len(splits.eval) == 493 and splits.report.skipped["gold_fails_on_database"] == 3
    assert splits.report.databases["no_database"] == 96  # baseball_1 and soccer_1: tables.json only


def test_training_and_ask_build_the_same_context_and_a_gold_table_is_kept(tmp_path: Path) -> None:
    db_file = seed_sqlite(tmp_path / "shop.sqlite")
    question = "How many orders shipped in May?"
    pairs = [{"question": question, "answer": "SELECT count(*) FROM orders WHERE shipped_month = 5"},
             {"question": "Which products did Ann buy?",
              "answer": "SELECT DISTINCT p.title FROM products AS p JOIN order_items AS i ON i.product_id = p.id JOIN "
                        "orders AS o ON o.id = i.order_id JOIN audit_log AS a ON a.id = o.id"}]
    rows, report = databases.read_pairs(pairs, str(db_file), context_chars=300)
    code, out, _ = cli("ask", question, "--database", str(db_file), "--sql", "SELECT 1", "--db-context-chars", "300",
                       "--format", "json")
    assert code == 0
    asked = json.loads(out)["schema"]["tables"]
    assert introspect.context_for(introspect.introspect(connect(str(db_file))), question, 300).tables == asked
    assert rows[0].context == introspect.introspect(connect(str(db_file))).context(asked)
    # the budget left audit_log out; the gold reads it, so that row keeps it
    assert "audit_log" not in rows[0].context and "CREATE TABLE audit_log" in rows[1].context
    assert all(f"CREATE TABLE {t} " in rows[1].context for t in ("products", "order_items", "orders", "audit_log"))
    assert report.tables_kept_for_gold >= 1 and report.tables_left_out == 2


def test_pairs_on_your_own_postgresql_database(pg_server, tmp_path: Path) -> None:
    pg_server.create_db("pairs_shop")
    url = pg_server.url("pairs_shop", READER, READER_PASS)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"question": f"How many customers live in {city}?",
             "sql": f"SELECT count(*) FROM customers WHERE city = '{city}'"} for city in ("Oslo", "Lima", "Rome")]
    rows += [{"question": "Broken?", "sql": "SELECT nope FROM customers"}, {"question": "Write?", "sql": "DELETE FROM customers"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = loading.load_splits(str(pairs), eval_fraction=0.0, db=loading.DatabaseOptions(database=url))
    assert len(splits.train) == 3 and all(ex.database == url for ex in splits.train)
    assert "CREATE TABLE customers" in splits.train[0].context
    assert splits.report.skipped["gold_fails_on_database"] == 2  # a wrong column, and a write the gate refuses
    assert "reader-pass" not in json.dumps(splits.report.to_dict())


def test_each_row_is_scored_on_its_own_database(tmp_path: Path) -> None:
    root = _layout(tmp_path / "spider")
    rows, _ = databases.read_layout(f"spider:{root}", context_chars=6000)
    by_q = {ex.question: ex for ex in rows}
    election = by_q["What are the first names of all candidates?"]
    shop = by_q["Which customers have shipped orders?"]
    scorer = RowDatabases({0: election, 1: election, 2: shop, 3: shop, 4: election})
    records = scorer.score([
        Item(0, election.question, election.context, election.answer, JOIN_GOLD),
        # a wrong JOIN (people joined to every candidate's votes): other rows, EX 0
        Item(1, election.question, election.context, election.answer,
             "SELECT T2.first_name FROM candidates AS T1 JOIN people AS T2 ON T1.votes > 0"),
        # the same rows in another order: right, as the gold has no ORDER BY
        Item(2, shop.question, shop.context, shop.answer,
             "SELECT DISTINCT name FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE status = "
             "'shipped') ORDER BY name DESC"),
        Item(3, shop.question, shop.context, "SELECT DISTINCT T1.name FROM customers AS T1 JOIN orders AS T2 ON "
             "T1.id = T2.customer_id WHERE T2.status = 'shipped' ORDER BY T1.name",
             "SELECT DISTINCT T1.name FROM customers AS T1 JOIN orders AS T2 ON T1.id = T2.customer_id WHERE "
             "T2.status = 'shipped' ORDER BY T1.name DESC"),
        Item(4, election.question, election.context, election.answer, "SELECT first_name FROM nowhere"),
    ])
    scorer.close()
    assert [r["ex"] for r in records] == [True, False, True, False, False]
    assert records[4]["error_kind"] and records[0]["db_id"] == "election"
    assert records[0]["kind"] == "multi_table" and records[0]["hardness"] == "easy"


def test_eval_on_a_layout_reports_ex_by_database_kind_and_hardness(tmp_path: Path) -> None:
    root = _layout(tmp_path / "spider")
    code, out, err = cli("eval", "--self-check", "--dataset", f"spider:{root}", "--heldout-databases", "shop",
                         "--split", "eval", "--report-dir", str(tmp_path / "report"))
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    results = report["results"]
    assert results["metrics"]["ex"]["value"] == 1.0 and results["examples"] == 2
    assert set(results["by_database"]) == {"shop"} and set(results["by_kind"]) == {"single_table", "multi_table"}
    assert "## By Spider hardness" in out


def test_spider_hardness_levels() -> None:
    assert hardness("SELECT count(*) FROM singer") == "easy"
    assert hardness("SELECT name, age FROM singer WHERE age > 30 ORDER BY age") == "medium"
    assert hardness("SELECT T1.name FROM a AS T1 JOIN b AS T2 ON T1.id = T2.id WHERE T2.x = 1 GROUP BY T1.name "
                    "HAVING count(*) > 2") == "hard"
    assert hardness("SELECT name FROM a WHERE id NOT IN (SELECT id FROM b) INTERSECT SELECT name FROM c") == "extra"
    assert hardness("SELEC nothing") == "unknown"


@pytest.mark.slow
def test_the_whole_loop_pairs_on_my_database_finetune_then_ask(tmp_path: Path) -> None:
    """README's loop: question / SQL pairs on a SQLite file, `finetune --database`, then `ask` that database with
    the model, which asks on contexts cut to the budget it was trained with."""
    from tests.conftest import run_sqltune

    db_file = seed_sqlite(tmp_path / "shop.sqlite")
    pairs = tmp_path / "pairs.jsonl"
    cities = ["Oslo", "Lima", "Rome", "Kyiv", "Pune"]
    rows = [{"question": f"How many customers live in {c}?", "answer": f"SELECT count(*) FROM customers WHERE city = '{c}'"}
            for c in cities] + [{"question": f"Which customers live in {c}?",
                                 "answer": f"SELECT name FROM customers WHERE city = '{c}'"} for c in cities]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "model"
    done = run_sqltune("finetune", "--model", "tiny", "--dataset", str(pairs), "--database", str(db_file),
                       "--db-context-chars", "400", "--max-steps", "4", "--train-batch-size", "4", "--tiny-layers", "1",
                       "--save-steps", "1000", "--eval-generate-limit", "2", "--eval-fraction", "0.2",
                       "--output", str(model))
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((model / "sqltune.json").read_text())
    assert meta["data"]["databases"]["rows_per_database"] == {"shop": 10}
    asked = run_sqltune("ask", "--model", str(model), "--database", str(db_file), "How many customers live in Oslo?",
                        "--format", "json", check=False)
    # a tiny model of four steps seldom writes SQL that runs (exit 1: the answer failed); the loop itself runs
    assert asked.returncode in (0, 1) and "Traceback" not in asked.stderr, asked.stderr[-2000:]
    answer = json.loads(asked.stdout)
    # the model's own budget: 400 characters leave some of the shop's five tables out, as in training
    assert answer["schema"]["left_out"] == ["audit_log", "order_items", "products"]
