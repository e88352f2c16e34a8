"""Every bad input to `python -m deepseek_jax.train` ends in one `error:` paragraph and exit
status 2 -- no traceback, and nothing under the workdir changed (issue 16's table).

The trainer's main runs in this process (the flags parsed by `cli.parse_flags`, as `app.run` would),
so the cases cost no interpreter start-up; all of them fail before anything is compiled. The
resume cases run against a real checkpoint of the same tiny config.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import pytest

from deepseek_jax import cli, errors
from deepseek_jax import config as config_lib
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.train import __main__ as train_main
from deepseek_jax.train import checkpoint, optim, sharded
from tests.data import corpora

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.py")
# configs/tiny.py on a small text corpus: every case below gets past the data unless it is the
# data that is wrong.
SMALL = {
    "train.seq_len": 16,
    "train.global_batch_size": 8,
    "train.eval_batches": 1,
    "data.eval_fraction": 0.3,
}


def _flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    docs = {f"{i}/{name}": text for i in range(4) for name, text in corpora.DOCS.items()}
    out = {"corpus": corpora.write_docs(str(root / "corpus"), docs)}
    (root / "empty.txt").write_text("")
    out["empty"] = str(root / "empty.txt")
    (root / "nonstring.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    out["nonstring"] = str(root / "nonstring.jsonl")
    (root / "nonjson.jsonl").write_text('{"text": "fine"}\nnot json at all\n')
    out["nonjson"] = str(root / "nonjson.jsonl")
    (root / "corrupt.json").write_text('{"model": {"type": "BPE", "vocab"')
    out["corrupt_tokenizer"] = str(root / "corrupt.json")
    out["big_tokenizer"] = _tokenizer(root / "tokenizer.json", vocab_size=320)  # model: 258
    (root / "a_file").write_text("not a directory")
    out["file"] = str(root / "a_file")
    return out


def _tokenizer(path: pathlib.Path, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpora.DOCS.values()) * 3, trainer=trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, files) -> pathlib.Path:
    """A workdir with one committed checkpoint of the base config (step 3)."""
    exp = config_lib.load(TINY, {**SMALL, "data.source": "text", "data.paths": (files["corpus"],)})
    workdir = tmp_path_factory.mktemp("saved")
    tx = optim.optimizer(exp.train)
    plan = plan_lib.make_plan(exp.parallel, exp.model, exp.train.global_batch_size)
    abstract = sharded.abstract_state(plan, exp.model, tx)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding), abstract
    )
    with checkpoint.Checkpointer(workdir) as ckpt:
        ckpt.save(3, state, data={"position": 0}, config=exp.to_dict(), wait=True)
    return workdir


def _snapshot(path: pathlib.Path) -> dict[str, tuple]:
    """Every file and directory under `path` (or `path` itself) with its size and mtime."""
    if not path.exists():
        return {}
    if path.is_file():
        st = path.stat()
        return {".": (st.st_size, st.st_mtime_ns)}
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(path))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def run_train(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python -m deepseek_jax.train <argv>`, run in this process."""
    capsys.readouterr()
    try:
        cli.parse_flags(["deepseek_jax.train", *argv])
        errors.guard(train_main.main)([])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def _text(files, key="corpus"):
    return {"data.source": "text", "data.paths": files[key]}


def _jsonl(files, key):
    return {"data.source": "jsonl", "data.paths": files[key]}


def _hf(files, path):
    return {**_text(files), "data.tokenizer": "hf", "data.tokenizer_path": path}


# (name, workdir kind, config file, overrides, extra flags, the expected text of the error line)
# workdir kind: "fresh" (an empty directory), "saved" (a copy of saved_run), "corrupt" (saved_run
# with a truncated state file), "file" (a plain file).
CASES = [
    (
        "data path missing",
        "fresh",
        TINY,
        lambda f: _text(f) | {"data.paths": "/no/such/corpus"},
        [],
        "data.paths[0]: no such file or directory: '/no/such/corpus'",
    ),
    ("empty data file", "fresh", TINY, lambda f: _text(f, "empty"), [], "empty document"),
    (
        "JSONL line not a string",
        "fresh",
        TINY,
        lambda f: _jsonl(f, "nonstring"),
        [],
        "nonstring.jsonl line 2",
    ),
    (
        "JSONL line not JSON",
        "fresh",
        TINY,
        lambda f: _jsonl(f, "nonjson"),
        [],
        "nonjson.jsonl line 2",
    ),
    (
        "tokenizer.json missing",
        "fresh",
        TINY,
        lambda f: _hf(f, "/no/tokenizer.json"),
        [],
        "data.tokenizer_path: no such file",
    ),
    (
        "tokenizer.json corrupt",
        "fresh",
        TINY,
        lambda f: _hf(f, f["corrupt_tokenizer"]),
        [],
        "is not a valid tokenizer.json",
    ),
    (
        "tokenizer vocabulary > model's",
        "fresh",
        TINY,
        lambda f: _hf(f, f["big_tokenizer"]),
        [],
        "raise the model's vocab_size to at least 320",
    ),
    (
        "devices not divisible by the mesh",
        "fresh",
        TINY,
        lambda f: _text(f) | {"parallel.preset": "data_expert", "parallel.expert": 3},
        [],
        "parallel: 8 devices are not divisible by the other mesh axes",
    ),
    (
        "unknown config field",
        "fresh",
        TINY,
        lambda f: _text(f) | {"model.n_expertz": 8},
        [],
        "section model has no field 'n_expertz' (did you mean n_shared_experts?)",
    ),
    (
        "unknown config section",
        "fresh",
        TINY,
        lambda f: _text(f) | {"modle.d_model": 8},
        [],
        "unknown config section 'modle' (did you mean model?)",
    ),
    (
        "config value of the wrong type",
        "fresh",
        TINY,
        lambda f: _text(f) | {"train.steps": "x"},
        [],
        "--config.train.steps=x",
    ),
    (
        "config file missing",
        "fresh",
        "configs/nope.py",
        lambda f: {},
        [],
        "--config=configs/nope.py: no such file",
    ),
    (
        "invalid config value",
        "fresh",
        TINY,
        lambda f: _text(f) | {"model.n_group": 3},
        [],
        "model.n_group: n_routed_experts=8 is not divisible by n_group=3",
    ),
    ("workdir is a file", "file", TINY, _text, [], "is a file, not a directory"),
    (
        "resume with another d_model",
        "saved",
        TINY,
        lambda f: _text(f) | {"model.d_model": 128},
        [],
        "model.d_model is 64 there, 128 now",
    ),
    (
        "resume with other n_routed_experts",
        "saved",
        TINY,
        lambda f: _text(f) | {"model.n_routed_experts": 16, "model.n_group": 4},
        [],
        "model.n_routed_experts is 8 there, 16 now",
    ),
    ("only checkpoint corrupt", "corrupt", TINY, _text, [], "no usable checkpoint in"),
    (
        "Optional field set: tokenizer_path without HF",
        "fresh",
        TINY,
        lambda f: _text(f) | {"data.tokenizer_path": "tok.json"},
        [],
        "data.tokenizer_path is only used with data.tokenizer=HF",
    ),
    (
        "Optional field set: init_from missing",
        "fresh",
        TINY,
        lambda f: _text(f) | {"checkpoint.init_from": "/no/such/run"},
        [],
        "checkpoint.init_from=/no/such/run: /no/such/run: neither a checkpoint step directory",
    ),
    (
        "coordinator host:notaport",
        "fresh",
        TINY,
        _text,
        ["--coordinator=host:notaport", "--num_processes=2", "--process_id=0"],
        "the port must be a number in 1-65535, got 'notaport'",
    ),
    (
        "coordinator without a colon",
        "fresh",
        TINY,
        _text,
        ["--coordinator=nocolon", "--num_processes=2", "--process_id=0"],
        "--coordinator=nocolon: expected HOST:PORT",
    ),
    (
        "coordinator :::",
        "fresh",
        TINY,
        _text,
        ["--coordinator=:::", "--num_processes=2", "--process_id=0"],
        "needs brackets",
    ),
    (
        "coordinator port out of range",
        "fresh",
        TINY,
        _text,
        ["--coordinator=localhost:70000", "--num_processes=2", "--process_id=0"],
        "got '70000'",
    ),
    (
        "process id out of range",
        "fresh",
        TINY,
        _text,
        ["--coordinator=localhost:1234", "--num_processes=2", "--process_id=2"],
        "--process_id must be in [0, 2) for --num_processes=2, got 2",
    ),
    (
        "coordinator without the process flags",
        "fresh",
        TINY,
        _text,
        ["--coordinator=localhost:1234"],
        "missing --num_processes, --process_id",
    ),
    (
        "coordinator unreachable",
        "fresh",
        TINY,
        _text,
        [
            "--coordinator=127.0.0.1:1",
            "--num_processes=2",
            "--process_id=1",
            "--coordinator_timeout_s=1",
        ],
        "could not reach the coordinator (process 0) within 1 s",
    ),
]


@pytest.mark.parametrize(
    "name,kind,config,overrides,extra,expected", CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_error_line(
    name, kind, config, overrides, extra, expected, files, saved_run, tmp_path, capsys
):
    workdir = tmp_path / "run"
    if kind == "file":
        workdir = pathlib.Path(files["file"])
    elif kind in ("saved", "corrupt"):
        shutil.copytree(saved_run, workdir)
        if kind == "corrupt":
            state = workdir / "checkpoints" / "3" / "state"
            victim = max(
                (p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
            )
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        workdir.mkdir()
        (workdir / "notes.txt").write_text("the user's own file")
    before = _snapshot(workdir)
    argv = [
        f"--config={config}",
        f"--workdir={workdir}",
        *_flags({**SMALL, **overrides(files)}),
        *extra,
    ]

    code, err = run_train(argv, capsys)

    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == errors.EXIT_BAD_INPUT, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and expected in lines[0], err
    assert _snapshot(workdir) == before


def test_corrupt_only_checkpoint_says_what_to_do(files, saved_run, tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    (workdir / "checkpoints" / "3" / "manifest.json").write_text("{")
    code, err = run_train(
        [f"--config={TINY}", f"--workdir={workdir}", *_flags({**SMALL, **_text(files)})], capsys
    )
    assert code == errors.EXIT_BAD_INPUT, err
    assert "step 3: manifest.json unreadable" in err
    assert "Nothing was moved or deleted" in err and "new --workdir" in err
    assert "falling back" not in caplog.text  # there is nothing older to fall back to
    assert not (workdir / "checkpoints" / checkpoint.QUARANTINE).exists()


def test_resume_with_train_changes_is_allowed_and_logged(files, saved_run, tmp_path, caplog):
    from deepseek_jax.train import config_diff

    exp = config_lib.load(
        TINY,
        {
            **SMALL,
            **_text(files),
            "data.paths": (files["corpus"],),
            "train.steps": 900,
            "train.lr": 1e-3,
            "model.remat": "full",
        },
    )
    changes = config_diff.check_resume(saved_run, exp)
    assert set(changes) == {"train.steps", "train.lr", "model.remat"}
    assert "resuming step 3 with train.steps changed: 600 -> 900" in caplog.text


def test_every_optional_field_is_settable_on_the_command_line(tmp_path):
    """Each `X | None` field of the experiment config, set by flag: parsed to its type."""
    from absl import flags
    from ml_collections import config_flags

    from deepseek_jax import dataclass_dict

    values = {str: "some/path.json", int: 16, float: 0.5, bool: True}
    optional = {}
    for section, cls in config_lib.section_types().items():
        for name, tp in dataclass_dict.field_types(cls).items():
            if (inner := dataclass_dict.optional_of(tp)) is not None:
                optional[f"{section}.{name}"] = values[inner]
    assert {"data.tokenizer_path", "checkpoint.init_from", "model.q_lora_rank"} <= set(optional)
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    v2_lite = str(REPO / "configs" / "deepseek_v2_lite.py")  # q_lora_rank=None there
    for config in (TINY, v2_lite):
        cli.parse_flags(["prog", f"--config={config}", *_flags(optional)], fv)
        for field, value in optional.items():
            section, name = field.split(".")
            assert holder.value[section][name] == value, field


def test_a_config_file_with_an_unknown_field_names_section_and_closest_name():
    cd = config_lib.default_config_dict()
    cd.train.warmup_step = 10
    with pytest.raises(
        config_lib.ConfigError,
        match=r"train.warmup_step: unknown field: section "
        r"train has no field 'warmup_step' \(did you mean warmup_steps\?\)",
    ):
        config_lib.from_config_dict(cd)


def test_info_takes_the_same_error_path(capsys):
    from deepseek_jax import info

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.parse_flags(["deepseek_jax.info", f"--config={TINY}", "--config.model.n_layers=0"])
        errors.guard(info.main)([])
    err = capsys.readouterr().err
    assert e.value.code == errors.EXIT_BAD_INPUT and "Traceback" not in err
    assert err.startswith("error: model.n_layers"), err
