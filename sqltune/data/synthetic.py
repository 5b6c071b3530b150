"""A deterministic generator of text-to-SQL examples in the sql-create-context shape.

    sqltune data synth --n 2000 --out data/synthetic.jsonl

Random schemas of 1-3 tables with typed columns, drawn from a handful of realistic domains;
questions in plain English with gold SQL covering SELECT, WHERE with AND, aggregates, GROUP BY,
ORDER BY ... LIMIT and JOIN. The same (n, seed) always gives the same rows: the offline data
source for the demo and the tests.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

# domain -> (entity singular, entity plural, text columns with values, numeric columns with ranges)
_DOMAINS: dict[str, tuple[str, str, dict[str, list[str]], dict[str, tuple[int, int]]]] = {
    "employee": ("employee", "employees",
                 {"name": ["Alice", "Bob", "Carla", "Deepak", "Elena", "Farid", "Grace", "Hiro"],
                  "department": ["Sales", "Finance", "Legal", "Research", "Support"],
                  "city": ["Paris", "Lagos", "Lima", "Osaka", "Denver", "Oslo"]},
                 {"age": (20, 65), "salary": (30000, 150000), "years_of_service": (0, 40)}),
    "player": ("player", "players",
               {"name": ["Ivan", "Jonas", "Kofi", "Luca", "Mateo", "Nils", "Omar", "Pablo"],
                "position": ["Guard", "Forward", "Center", "Goalkeeper", "Defender"],
                "team": ["Eagles", "Tigers", "Sharks", "Wolves", "Falcons"]},
               {"points": (0, 900), "games": (1, 82), "height": (160, 215)}),
    "book": ("book", "books",
             {"title": ["Dune", "Emma", "Ulysses", "Beloved", "Solaris", "Ivanhoe"],
              "author": ["Herbert", "Austen", "Joyce", "Morrison", "Lem", "Scott"],
              "genre": ["Fiction", "Science", "History", "Poetry", "Drama"]},
             {"pages": (80, 1200), "price": (5, 90), "year": (1800, 2024)}),
    "film": ("film", "films",
             {"title": ["Alien", "Heat", "Vertigo", "Psycho", "Rocky", "Jaws"],
              "director": ["Scott", "Mann", "Hitchcock", "Avildsen", "Spielberg"],
              "rating": ["G", "PG", "PG-13", "R"]},
             {"duration": (70, 200), "budget": (1, 300), "release_year": (1950, 2024)}),
    "station": ("station", "stations",
                {"name": ["Central", "Harbor", "Airport", "Museum", "Stadium", "Park"],
                 "line": ["Red", "Blue", "Green", "Yellow"],
                 "district": ["North", "South", "East", "West"]},
                {"platforms": (1, 12), "daily_passengers": (100, 90000), "opened": (1900, 2020)}),
    "product": ("product", "products",
                {"name": ["Lamp", "Chair", "Kettle", "Drill", "Mixer", "Fan"],
                 "category": ["Home", "Garden", "Kitchen", "Tools"],
                 "brand": ["Acme", "Bolt", "Crest", "Delta", "Nova"]},
                {"price": (3, 900), "stock": (0, 500), "weight": (1, 60)}),
    "hospital": ("hospital", "hospitals",
                 {"name": ["Mercy", "General", "St Luke", "Riverside", "Hope"],
                  "city": ["Boston", "Austin", "Leeds", "Porto", "Accra"],
                  "state": ["Open", "Closed", "Renovating"]},
                 {"beds": (20, 1500), "doctors": (5, 600), "founded": (1850, 2015)}),
}

# parent domain -> (child table, child text column with values, child numeric column with range)
_CHILDREN: dict[str, tuple[str, str, list[str], str, tuple[int, int]]] = {
    "employee": ("project", "project_name", ["Apollo", "Borealis", "Comet", "Drift"], "hours", (1, 400)),
    "player": ("match", "opponent", ["Rovers", "United", "Athletic", "City"], "minutes", (1, 90)),
    "book": ("review", "reviewer", ["Ann", "Ben", "Cy", "Dee"], "stars", (1, 5)),
    "film": ("screening", "cinema", ["Rex", "Odeon", "Roxy", "Lux"], "tickets", (0, 500)),
    "station": ("train", "operator", ["Rail One", "Metro", "Express"], "cars", (2, 16)),
    "product": ("order_item", "customer", ["Kim", "Lee", "Max", "Noa"], "quantity", (1, 50)),
    "hospital": ("ward", "ward_name", ["Cardio", "Neuro", "Maternity", "Oncology"], "capacity", (5, 80)),
}


@dataclass(frozen=True)
class _Table:
    name: str
    text: dict[str, list[str]]
    nums: dict[str, tuple[int, int]]
    singular: str
    plural: str

    def ddl(self, key: str | None = None, fk: str | None = None) -> str:
        cols = [f"{key} INTEGER"] if key else []
        cols += [f"{c} VARCHAR" for c in self.text] + [f"{c} INTEGER" for c in self.nums]
        cols += [f"{fk} INTEGER"] if fk else []
        return f"CREATE TABLE {self.name} ({', '.join(cols)})"


def _words(col: str) -> str:
    return col.replace("_", " ")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _table(rng: random.Random, domain: str) -> _Table:
    singular, plural, text, nums = _DOMAINS[domain]
    text_cols = dict(rng.sample(sorted(text.items()), k=rng.randint(2, len(text))))
    num_cols = dict(rng.sample(sorted(nums.items()), k=rng.randint(1, len(nums))))
    name = rng.choice([singular, plural, f"{singular}_info"])
    return _Table(name, text_cols, num_cols, singular, plural)


def _single(rng: random.Random, t: _Table) -> tuple[str, str]:
    tcol = rng.choice(sorted(t.text))
    tval = rng.choice(t.text[tcol])
    ncol = rng.choice(sorted(t.nums))
    lo, hi = t.nums[ncol]
    nval = rng.randint(lo, hi)
    other = rng.choice([c for c in sorted(t.text) if c != tcol] or [tcol])
    kind = rng.randrange(9)
    if kind == 0:
        return (f"What is the {_words(other)} of the {t.singular} whose {_words(tcol)} is {tval}?",
                f"SELECT {other} FROM {t.name} WHERE {tcol} = {_quote(tval)}")
    if kind == 1:
        op, word = rng.choice([(">", "more than"), ("<", "less than"), (">=", "at least")])
        return (f"How many {t.plural} have a {_words(ncol)} {word} {nval}?",
                f"SELECT COUNT(*) FROM {t.name} WHERE {ncol} {op} {nval}")
    if kind == 2:
        fn, word = rng.choice([("AVG", "average"), ("SUM", "total"), ("MAX", "highest"), ("MIN", "lowest")])
        return (f"What is the {word} {_words(ncol)} of {t.plural} with {_words(tcol)} {tval}?",
                f"SELECT {fn}({ncol}) FROM {t.name} WHERE {tcol} = {_quote(tval)}")
    if kind == 3:
        oval = rng.choice(t.text[other])
        if other == tcol:
            return (f"List the {_words(ncol)} of {t.plural} whose {_words(tcol)} is {tval}.",
                    f"SELECT {ncol} FROM {t.name} WHERE {tcol} = {_quote(tval)}")
        return (f"Which {t.plural} have {_words(tcol)} {tval} and {_words(other)} {oval}? Give the {_words(ncol)}.",
                f"SELECT {ncol} FROM {t.name} WHERE {tcol} = {_quote(tval)} AND {other} = {_quote(oval)}")
    if kind == 4:
        return (f"List the {_words(other)} of {t.plural} with {_words(tcol)} {tval} and {_words(ncol)} above {nval}.",
                f"SELECT {other} FROM {t.name} WHERE {tcol} = {_quote(tval)} AND {ncol} > {nval}")
    if kind == 5:
        return (f"How many {t.plural} are there for each {_words(tcol)}?",
                f"SELECT {tcol}, COUNT(*) FROM {t.name} GROUP BY {tcol}")
    if kind == 6:
        fn, word = rng.choice([("AVG", "average"), ("MAX", "maximum"), ("SUM", "total")])
        return (f"What is the {word} {_words(ncol)} for each {_words(tcol)}?",
                f"SELECT {tcol}, {fn}({ncol}) FROM {t.name} GROUP BY {tcol}")
    if kind == 7:
        n = rng.randint(1, 5)
        order, word = rng.choice([("DESC", "highest"), ("ASC", "lowest")])
        return (f"Which {n} {t.plural} have the {word} {_words(ncol)}? Give their {_words(tcol)}.",
                f"SELECT {tcol} FROM {t.name} ORDER BY {ncol} {order} LIMIT {n}")
    return (f"List the distinct {_words(tcol)} values of {t.plural} ordered by {_words(tcol)}.",
            f"SELECT DISTINCT {tcol} FROM {t.name} ORDER BY {tcol}")


def _join(rng: random.Random, domain: str) -> tuple[str, str, str]:
    parent = _table(rng, domain)
    child_name, ctext, cvals, cnum, (lo, hi) = _CHILDREN[domain]
    key, fk = f"{parent.singular}_id", f"{parent.singular}_id"
    child_ddl = f"CREATE TABLE {child_name} ({child_name}_id INTEGER, {ctext} VARCHAR, {cnum} INTEGER, {fk} INTEGER)"
    context = f"{parent.ddl(key=key)}; {child_ddl}"
    tcol = rng.choice(sorted(parent.text))
    tval = rng.choice(parent.text[tcol])
    on = f"ON T1.{fk} = T2.{key}"
    kind = rng.randrange(3)
    if kind == 0:
        q = f"What are the {_words(ctext)} values of {child_name.replace('_', ' ')}s for the {parent.singular} with {_words(tcol)} {tval}?"
        sql = f"SELECT T1.{ctext} FROM {child_name} AS T1 JOIN {parent.name} AS T2 {on} WHERE T2.{tcol} = {_quote(tval)}"
    elif kind == 1:
        q = f"What is the total {_words(cnum)} for each {parent.singular} {_words(tcol)}?"
        sql = f"SELECT T2.{tcol}, SUM(T1.{cnum}) FROM {child_name} AS T1 JOIN {parent.name} AS T2 {on} GROUP BY T2.{tcol}"
    else:
        n = rng.randint(lo, hi)
        q = f"Which {parent.singular} {_words(tcol)} values have a {child_name.replace('_', ' ')} with {_words(cnum)} over {n}?"
        sql = f"SELECT DISTINCT T2.{tcol} FROM {child_name} AS T1 JOIN {parent.name} AS T2 {on} WHERE T1.{cnum} > {n}"
    return q, context, sql


def generate(n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """Yield n examples with `question`, `context`, `answer`; deterministic in (n, seed)."""
    rng = random.Random(seed)
    domains = sorted(_DOMAINS)
    for _ in range(n):
        domain = rng.choice(domains)
        shape = rng.random()
        if shape < 0.2:
            q, context, sql = _join(rng, domain)
        else:
            t = _table(rng, domain)
            q, sql = _single(rng, t)
            context = t.ddl()
            if shape > 0.85:  # a distractor table: the model must pick the right one
                other = _table(rng, rng.choice([d for d in domains if d != domain]))
                context = f"{context}; {other.ddl()}"
        yield {"question": q, "context": context, "answer": sql}
