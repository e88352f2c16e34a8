"""The GRPO loop: a run killed after step 2 and resumed reproduces the uninterrupted run's step
3 exactly; bad input fails before any compile and leaves saved checkpoints alone."""

from __future__ import annotations

import json
import shutil

import pytest

from deepseek_jax import errors
from deepseek_jax.rl import config as rl_config
from deepseek_jax.rl import loop
from deepseek_jax.train import metrics as metrics_lib

TIME_KEYS = ("time", "rollout_s", "step_s")


def experiment(policy, **overrides) -> rl_config.RLExperimentConfig:
    d = {
        "model": policy.cfg.to_dict(),
        "rl": {"steps": 3, "prompts_per_step": 2, "max_new_tokens": 60, "seq_len": 100},
        "grpo": {"group_size": 4},
        "task": {"problems": 16},
        "checkpoint": {"every_steps": 1, "keep_last": 5, "init_from": policy.step_dir},
    }
    for key, value in overrides.items():
        section, field = key.split(".")
        d.setdefault(section, {})[field] = value
    return rl_config.from_config_dict(d)


def records(workdir):
    out = metrics_lib.read_metrics(workdir)
    return {r["step"]: {k: v for k, v in r.items() if k not in TIME_KEYS} for r in out}


@pytest.fixture(scope="module")
def uninterrupted(trained_policy, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rl") / "whole"
    summary = loop.run(experiment(trained_policy), workdir)
    return workdir, summary


def test_killed_and_resumed_run_reproduces_the_rewards(trained_policy, uninterrupted, tmp_path):
    whole, summary = uninterrupted
    assert summary["start_step"] == 0 and summary["step"] == 3
    want = records(whole)
    assert sorted(want) == [1, 2, 3]
    # The run was killed after step 2's checkpoint: step 3 and its metrics never happened.
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    shutil.rmtree(killed / "checkpoints" / "3")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if json.loads(line).get("step") != 3)
    )
    resumed = loop.run(experiment(trained_policy), killed)
    assert resumed["start_step"] == 2 and resumed["step"] == 3
    got = records(killed)
    assert sum(want[s]["reward_max"] for s in want) > 0  # some rewards, so real gradients
    assert got[3] == want[3]  # rewards, KL, loss, grad norm, lengths: bit-identical
    # The state matters: step 3 differs from step 2, so a resume from the wrong state would show.
    assert want[3]["kl"] != want[2]["kl"] and want[3]["grad_norm"] != want[2]["grad_norm"]


def test_metrics_are_recorded_per_step(uninterrupted):
    rec = records(uninterrupted[0])[3]
    for key in (
        "reward_mean",
        "reward_max",
        "reward_accuracy_mean",
        "reward_format_max",
        "accuracy",
        "kl",
        "clip_fraction",
        "response_length",
        "logprob_diff",
        "grad_norm",
    ):
        assert key in rec, key
    assert 0 < rec["response_length"] <= 60
    assert rec["logprob_diff"] < 1e-5 and rec["logprob_diff_max"] < 1e-4
    assert rec["kl"] > 0  # the policy moved away from the reference


def _saved(workdir):
    return sorted(
        (p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grpo.group_size": 1}, "grpo.group_size must be an int >= 2"),
        ({"grpo.beta": -0.1}, "grpo.beta must be >= 0"),
        ({"grpo.epsilon": 0.0}, "grpo.epsilon must be > 0"),
        ({"rl.max_new_tokens": 100}, "rl.max_new_tokens: 100 leaves no room"),
        ({"rewards.accuracy": -1.0}, "rewards.accuracy: weights must be >= 0"),
        ({"task.length": -1}, "task.length: fixes the reverse task's word length"),
    ],
)
def test_bad_config_names_the_field(trained_policy, overrides, message):
    with pytest.raises(errors.UserError, match=message):
        experiment(trained_policy, **overrides)


def test_bad_inputs_fail_before_touching_saved_checkpoints(
    trained_policy, uninterrupted, monkeypatch
):
    whole, _ = uninterrupted
    before = _saved(whole)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the input checks")

    monkeypatch.setattr(loop.state_lib, "init_state", no_compile)
    cases = [
        (
            experiment(trained_policy, **{"rl.seq_len": 70}),
            "rl.seq_len: the prompt .* is \\d+ tokens",
        ),
        (
            experiment(trained_policy, **{"checkpoint.init_from": "/no/such/sft"}),
            "init_from=/no/such/sft",
        ),
        (
            experiment(trained_policy, **{"checkpoint.init_from": None}),
            "checkpoint.init_from: required",
        ),
        (
            experiment(trained_policy, **{"model.intermediate_size": 96}),
            "different model .*model.intermediate_size",
        ),
    ]
    for exp, message in cases:
        with pytest.raises(errors.UserError, match=message):
            loop.run(exp, whole)
    assert _saved(whole) == before


def test_a_workdir_of_another_kind_of_run_is_refused(
    trained_policy, uninterrupted, tmp_path, monkeypatch
):
    other = tmp_path / "sft"
    shutil.copytree(uninterrupted[0] / "checkpoints", other / "checkpoints")
    meta = other / "checkpoints" / "3" / "config" / "metadata"
    doc = json.loads(meta.read_text())
    del doc["rl"]  # as a pre-training or SFT run saves it
    meta.write_text(json.dumps(doc))
    before = _saved(other)
    with pytest.raises(errors.UserError, match="not an rl run"):
        loop.run(experiment(trained_policy), other)
    assert _saved(other) == before


def test_cli_reports_bad_input_in_one_paragraph(tmp_path):
    # A subprocess, as a user runs it: absl flags are process-global, and the train CLI's
    # --workdir is already defined in this pytest process.
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[2]

    def cli(*extra):
        argv = [sys.executable, "-m", "deepseek_jax.rl", "--config=configs/grpo_tiny.py"]
        argv += [f"--workdir={tmp_path / 'run'}", *extra]
        return subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=120)

    bad = cli("--config.grpo.group_size=1")
    assert bad.returncode == errors.EXIT_BAD_INPUT
    assert bad.stderr.startswith("error: grpo.group_size must be an int >= 2"), bad.stderr
    assert "Traceback" not in bad.stderr
    typo = cli("--config.grpo.G=8")
    assert typo.returncode != 0 and "grpo.G: unknown field" in typo.stderr
    assert not (tmp_path / "run").exists()


def test_the_grpo_result_exports_to_hf_and_matches_transformers(uninterrupted, tmp_path):
    """The RL state holds the policy under "policy": to-hf finds it, and the export's logits
    under transformers equal the trained policy's (convert verify, float32)."""
    from deepseek_jax.convert import __main__ as convert_cli
    from deepseek_jax.convert import verify

    whole, _ = uninterrupted
    out = tmp_path / "hf"
    argv = ["to-hf", f"--checkpoint={whole}", f"--out={out}", "--dtype=float32"]
    assert convert_cli.main(argv) == 0
    result = verify.verify(whole, out, seq_len=16)
    assert result.ok and result.max_abs_diff <= 1e-4, result
