from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sqltune import config
from sqltune.config import Config, load
from sqltune.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_yaml_env_flags(tmp_path: Path) -> None:
    yaml = write(tmp_path, "lora_r: 4\nlora_alpha: 8\nlearning_rate: 0.001\n")
    cfg, sources = load(["--config", yaml, "--lora-alpha", "64"], {"LORA_R": "16", "LORA_ALPHA": "32"})
    assert cfg.lora_r == 16 and sources["lora_r"] == "env LORA_R"  # env beats YAML
    assert cfg.lora_alpha == 64 and sources["lora_alpha"] == "flag --lora-alpha"  # flag beats env
    assert cfg.learning_rate == 0.001 and sources["learning_rate"].startswith("config ")
    assert cfg.seed == Config().seed and "seed" not in sources


def test_tutorial_environment_names() -> None:
    env = {"MODEL_NAME": "google/gemma-2b", "NEW_MODEL": "gemma-2b-sql", "LORA_R": "8", "LORA_ALPHA": "16",
           "GRADIENT_ACCUMULATION_STEPS": "4", "DATASET_LIMIT": "1000", "LOGGING_STEPS": "5",
           "MAX_SEQ_LENGTH": "384", "TRAIN_BATCH_SIZE": "2", "EVAL_BATCH_SIZE": "3", "HF_TOKEN": "hf_secret"}
    cfg, _ = load([], env)
    assert (cfg.model_name, cfg.new_model, cfg.lora_r, cfg.lora_alpha) == ("google/gemma-2b", "gemma-2b-sql", 8, 16)
    assert (cfg.gradient_accumulation_steps, cfg.dataset_limit, cfg.logging_steps) == (4, 1000, 5)
    assert (cfg.max_seq_length, cfg.train_batch_size, cfg.eval_batch_size) == (384, 2, 3)
    assert cfg.output_dir == "models/gemma-2b-sql"
    assert "hf_secret" not in str(cfg.to_dict()) and "hf_secret" not in config.render(cfg, {})


def test_dataset_limit_minus_one_means_all() -> None:
    assert load([], {"DATASET_LIMIT": "-1"})[0].dataset_limit == -1
    with pytest.raises(ConfigError, match="--dataset-limit"):
        load([], {"DATASET_LIMIT": "-2"})


def test_prefixed_environment_wins_over_bare() -> None:
    cfg, sources = load([], {"SQLTUNE_LORA_R": "12", "LORA_R": "4"})
    assert cfg.lora_r == 12 and sources["lora_r"] == "env SQLTUNE_LORA_R"


def test_generic_bare_names_in_the_shell_change_nothing() -> None:
    """Only the tutorial's variables (and the platform's) are read bare; SEED or OUTPUT from an unrelated
    tool must not change a run."""
    cfg, sources = load([], {"SEED": "7", "OUTPUT": "/elsewhere", "METHOD": "full", "RESUME": "never", "LORA_R": "4"})
    assert (cfg.seed, cfg.output, cfg.method, cfg.resume) == (Config().seed, "", "auto", "auto")
    assert cfg.lora_r == 4 and sources == {"lora_r": "env LORA_R"}
    assert load([], {"SQLTUNE_SEED": "7"})[0].seed == 7


@pytest.mark.parametrize(("argv", "env", "needle"), [
    ([], {"LORA_R": "eight"}, "LORA_R"),
    ([], {"SQLTUNE_LEARNING_RATE": "fast"}, "learning_rate"),
    ([], {"SQLTUNE_LEARNING_RATE": "nan"}, "finite"),
    (["--learning-rate", "inf"], {}, "finite"),
    ([], {"SQLTUNE_GRADIENT_CHECKPOINTING": "maybe"}, "true or false"),
    (["--lora-r", "0"], {}, "--lora-r"),
    (["--method", "prompt-tuning"], {}, "method"),
    ([], {"SQLTUNE_METHOD": "prompt-tuning"}, "qlora"),
])
def test_bad_values_name_the_flag(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(argv, env)
    assert needle in str(err.value)


def test_unknown_yaml_key_suggests_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="(?s)lora_rank.*did you mean `lora_r`"):
        load(["--config", write(tmp_path, "lora_rank: 8\n")], {})


def test_yaml_wrong_type_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an integer"):
        load(["--config", write(tmp_path, "max_steps: [1, 2]\n")], {})
    with pytest.raises(ConfigError, match="does not exist"):
        load(["--config", str(tmp_path / "nope.yaml")], {})


def test_target_modules_from_env_and_yaml(tmp_path: Path) -> None:
    assert load([], {"SQLTUNE_TARGET_MODULES": "q_proj, v_proj"})[0].target_modules == ["q_proj", "v_proj"]
    yaml = write(tmp_path, "target_modules: [q_proj, k_proj]\n")
    assert load(["--config", yaml], {})[0].target_modules == ["q_proj", "k_proj"]


def test_every_field_has_help_and_a_flag() -> None:
    for f in dataclasses.fields(Config):
        assert f.metadata["help"], f.name
        assert config.flag_name(f.name) == "--" + f.name.replace("_", "-")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg, sources = load(["--config", str(path)], {})
    assert sources, f"{path.name} sets nothing"
    first = path.read_text().splitlines()[:3]
    assert any("sqltune " in line for line in first), f"{path.name} must start with its launch command"
    assert cfg.model_name


def test_config_show_marks_sources(capsys: pytest.CaptureFixture[str]) -> None:
    from sqltune.cli import main

    assert main(["config", "show", "--lora-r", "32"]) == 0
    out = capsys.readouterr().out
    assert "lora_r: 32  # flag --lora-r" in out
    assert "lora_alpha: 16\n" in out


@pytest.mark.parametrize(("text", "needle"), [
    ("max_steps: 1.0e+23\n", "out of range"),  # was accepted as 99999999999999991611392 steps
    ("lora_r: 8\nlora_r: 16\n", "`lora_r` appears twice"),  # PyYAML silently kept the last one
])
def test_huge_integers_and_duplicate_keys_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(["--config", write(tmp_path, text)], {})
    with pytest.raises(ConfigError, match="out of range"):
        load(["--max-steps", "100000000000000000000000"], {})


# --- bad input on the command line: one error line and its fix, exit 2, no traceback, nothing created ---

def _bad_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize(("args", "needle"), [
    (["ask", "--database", "postgresql://u:pw@127.0.0.1:notaport/shop", "How many?"], "port is not a number"),
    (["ask", "--database", "postgresql://u:pw@[::1:15432/shop", "How many?"], "port is not a number"),
    (["eval", "--predictions", "{bad_utf8_jsonl}"], "line 2 is not UTF-8"),
    (["config", "show", "--config", "{bad_utf8_yaml}"], "is not UTF-8"),
    (["export", "gguf", "--model", "{tmp}", "--out", "/proc/x.gguf"], "cannot write in /proc"),
    (["export", "gguf", "--model", "{tmp}", "--out", "/nonexistent-sqltune/dir/x.gguf"], "does not exist"),
])
def test_bad_command_line_input_is_one_error_and_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    from tests.conftest import run_sqltune

    paths = {"bad_utf8_jsonl": _bad_bytes(tmp_path, "p.jsonl", b'{"predicted": "SELECT 1"}\n\xff\xfe\n'),
             "bad_utf8_yaml": _bad_bytes(tmp_path, "c.yaml", b"lora_r: \xff\n"), "tmp": str(tmp_path)}
    done = run_sqltune(*[a.format(**paths) for a in args], check=False, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and needle in done.stderr, done.stderr[-2000:]
    assert "pw" not in done.stderr  # the password never shows
    assert not Path("/nonexistent-sqltune").exists()


def test_serve_listens_locally_unless_the_deployment_says_otherwise() -> None:
    """The help says 127.0.0.1 keeps the server local, so that is the default; what runs in a container
    (the serving image, every rendered manifest) asks for 0.0.0.0 explicitly."""
    root = Path(__file__).parents[1]
    assert load([], {})[0].serve_host == "127.0.0.1"
    dockerfile = (root / "docker" / "Dockerfile.serve").read_text()
    assert "SQLTUNE_SERVE_HOST=0.0.0.0" in dockerfile and '"--host", "0.0.0.0"' in dockerfile
    manifests = sorted((root / "tests" / "golden").glob("*/*.yaml"))
    serving = [m for m in manifests if "--serve-port" in m.read_text()]
    assert serving, manifests
    for manifest in serving:
        assert "- --host\n" in manifest.read_text() and "- 0.0.0.0\n" in manifest.read_text(), manifest


def test_several_datasets_from_a_yaml_list_env_or_flag(tmp_path: Path) -> None:
    from sqltune.data.loading import parse_sources

    y = tmp_path / "c.yaml"
    y.write_text("dataset:\n  - a.jsonl\n  - spider:../data/spider*2\n")
    cfg, _ = config.load(["--config", str(y)], {})
    assert parse_sources(cfg.dataset) == [("a.jsonl", 1.0), ("spider:../data/spider", 2.0)]
    cfg, _ = config.load([], {"SQLTUNE_DATASET": "a.jsonl,b.jsonl*0.5"})
    assert parse_sources(cfg.dataset) == [("a.jsonl", 1.0), ("b.jsonl", 0.5)]
    cfg, _ = config.load(["--dataset", "spider:DIR", "--heldout-databases", "wedding,cinema"], {})
    assert cfg.heldout_databases == ["wedding", "cinema"]
    # the flags replace the config's list, each repeat one more source: none is dropped
    cfg, _ = config.load(["--config", str(y), "--dataset", "a.jsonl*0.25", "--dataset", "spider:DIR"], {})
    assert parse_sources(cfg.dataset) == [("a.jsonl", 0.25), ("spider:DIR", 1.0)]


def test_a_model_s_training_config_fills_what_the_user_left_unset(tmp_path):
    import json

    from sqltune.finetune.common import as_start_model

    trained = {"db_context_chars": 1000, "db_keys": False, "seed": "not an int"}
    cfg, sources = load([], {})
    assert config.as_trained(cfg, sources, trained, ("db_context_chars", "seed")).db_context_chars == 1000
    assert config.as_trained(cfg, sources, trained, ("seed",)).seed == cfg.seed  # a value of the wrong type is ignored
    # a model trained on bare columns (--no-db-keys) is asked on bare columns: a false value is inherited too
    inherited = config.as_trained(cfg, sources, trained)
    assert (inherited.db_context_chars, inherited.db_keys) == (1000, False)
    cfg, sources = load(["--db-context-chars", "3000", "--db-keys"], {})
    inherited = config.as_trained(cfg, sources, trained)
    assert (inherited.db_context_chars, inherited.db_keys) == (3000, True)  # the user's flags win

    # GRPO or continued SFT from a finished model: its contexts are cut to the model's own budget
    (tmp_path / "sqltune.json").write_text(json.dumps({"config": trained}))
    cfg, sources = load(["--model", str(tmp_path), "--method", "grpo"], {})
    assert as_start_model(cfg, sources).db_context_chars == 1000
    assert as_start_model(cfg, sources).db_keys is False
    cfg, sources = load(["--model", "smollm2-135m"], {})
    assert as_start_model(cfg, sources).db_context_chars == cfg.db_context_chars  # a base model has no budget
