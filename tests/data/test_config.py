"""DataConfig: defaults, from_dict parsing, and errors that name the field."""

import pytest

from deepseek_jax.data import config


def test_defaults_are_the_stdlib_with_bytes():
    cfg = config.DataConfig()
    assert cfg.source is config.SourceKind.STDLIB
    assert cfg.tokenizer is config.TokenizerKind.BYTE
    assert cfg.paths == ()


def test_from_dict_parses_enums_and_paths():
    cfg = config.DataConfig.from_dict(
        {
            "source": "jsonl",
            "paths": "/x/*.jsonl",
            "text_field": "body",
            "tokenizer": "HF",
            "tokenizer_path": "/t/tokenizer.json",
            "eval_fraction": 0.1,
            "split_seed": 3,
        }
    )
    assert cfg.source is config.SourceKind.JSONL
    assert cfg.tokenizer is config.TokenizerKind.HF
    assert cfg.paths == ("/x/*.jsonl",)
    assert config.DataConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_accepts_a_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cd = ml_collections.ConfigDict({"source": "text", "paths": ["a", "b"], "eval_fraction": 0.5})
    cfg = config.DataConfig.from_dict(cd)
    assert cfg.paths == ("a", "b") and cfg.source is config.SourceKind.TEXT


@pytest.mark.parametrize(
    "values, message",
    [
        ({"eval_fraction": 1.5}, "data.eval_fraction must be in (0, 1), got 1.5"),
        ({"eval_fraction": 0}, "data.eval_fraction must be in (0, 1), got 0.0"),
        ({"eval_fractoin": 0.1}, "data.eval_fractoin is not a data option"),
        (
            {"source": "parquet"},
            "data.source must be one of ['STDLIB', 'TEXT', 'JSONL', 'ARRAY_RECORD'], got 'parquet'",
        ),
        ({"tokenizer": "sentencepiece"}, "data.tokenizer must be one of ['BYTE', 'HF']"),
        ({"paths": ["/x"]}, "data.paths must be empty for data.source=STDLIB"),
        ({"source": "text"}, "data.paths must name at least one path for data.source=TEXT"),
        ({"source": "text", "paths": [""]}, "data.paths must not contain empty strings"),
        ({"tokenizer": "hf"}, "data.tokenizer_path must name a local tokenizer.json"),
        ({"eos_token": "</s>"}, "data.eos_token is only used with data.tokenizer=HF"),
        ({"split_seed": -1}, "data.split_seed must be >= 0, got -1"),
        ({"split_seed": True}, "data.split_seed must be an int, got True"),
        ({"shuffle": 1}, "data.shuffle must be a bool, got 1"),
        ({"num_threads": -2}, "data.num_threads must be >= 0, got -2"),
        ({"prefetch_batches": 1.5}, "data.prefetch_batches must be an int, got 1.5"),
        ({"text_field": ""}, "data.text_field must be a non-empty string"),
        ({"paths": 3, "source": "text"}, "data.paths must be a string or a list of strings"),
    ],
)
def test_invalid_values_name_the_field(values, message):
    with pytest.raises(ValueError) as e:
        config.DataConfig.from_dict(values)
    assert message in str(e.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="data.source must be a SourceKind"):
        config.DataConfig(source="stdlib")  # type: ignore[arg-type]
