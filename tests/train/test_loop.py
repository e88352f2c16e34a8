"""The real training loop on the embedded corpus: learning, metrics, checkpoints, resume, plots."""

import pytest

from deepseek_jax import config as experiment
from deepseek_jax import plot
from deepseek_jax.train import loop, metrics

OVERRIDES = {
    "train.steps": 12,
    "train.global_batch_size": 8,
    "train.seq_len": 64,
    "train.lr": 1e-2,
    "train.warmup_steps": 2,
    "train.log_every": 4,
    "train.eval_every": 6,
    "train.eval_batches": 2,
    "checkpoint.every_steps": 6,
    "checkpoint.async_save": False,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    summary = loop.run(experiment.load("configs/tiny.py", OVERRIDES), workdir)
    return workdir, summary


def test_short_run_learns_and_logs(run):
    workdir, summary = run
    assert summary["step"] == 12 and summary["start_step"] == 0 and not summary["preempted"]
    assert summary["eval_bpb_start"] > 7.5  # ~log2(258): an untrained byte model
    assert summary["eval_bpb_end"] < summary["eval_bpb_start"] - 1.0
    records = metrics.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [4, 8, 12]
    assert [r["step"] for r in evals] == [0, 6, 12]
    for key in [
        "loss",
        "lm_loss",
        "mtp_loss",
        "balance_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "skipped_steps",
        "expert_load",
        "expert_bias_norm",
    ]:
        assert key in train[-1], key
    assert len(train[-1]["expert_load"]) == 3  # 2 main MoE layers + 1 MTP layer
    assert train[-1]["moe_layer_ids"] == [1, 2, 3]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "12",
        "6",
    ]


def test_resume_continues_from_the_last_checkpoint(run):
    workdir, _ = run
    more = experiment.load("configs/tiny.py", {**OVERRIDES, "train.steps": 14})
    summary = loop.run(more, workdir)
    assert summary["start_step"] == 12 and summary["step"] == 14
    assert "eval_bpb_start" not in summary  # no step-0 evaluation on a resumed run


def test_plot_command_on_a_real_run(run, tmp_path):
    workdir, _ = run
    assert plot.main([f"--workdir={workdir}", f"--out={tmp_path}"]) == 0
    pngs = {p.name: p.stat().st_size for p in tmp_path.glob("*.png")}
    for name in ["loss.png", "lr.png", "expert_load.png"]:
        assert pngs.get(name, 0) > 1000, (name, pngs)


def test_fine_tune_from_a_converted_checkpoint(run, tmp_path):
    """to-hf, from-hf, then train from it: the first evaluation equals the source run's last."""
    from deepseek_jax.convert import __main__ as convert_cli

    workdir, summary = run
    assert (
        convert_cli.main(
            [
                "to-hf",
                f"--checkpoint={workdir}",
                "--step=12",
                f"--out={tmp_path / 'hf'}",
                "--dtype=float32",
            ]
        )
        == 0
    )
    assert (
        convert_cli.main(
            ["from-hf", f"--hf-dir={tmp_path / 'hf'}", f"--out={tmp_path / 'imported'}"]
        )
        == 0
    )
    tuned = loop.run(
        experiment.load(
            "configs/tiny.py",
            {**OVERRIDES, "train.steps": 2, "checkpoint.init_from": str(tmp_path / "imported")},
        ),
        tmp_path / "tune",
    )
    assert tuned["start_step"] == 0
    assert abs(tuned["eval_bpb_start"] - summary["eval_bpb_end"]) < 1e-4
    with pytest.raises(ValueError, match="model.*n_layers: checkpoint 3 vs config 4"):
        loop.run(
            experiment.load(
                "configs/tiny.py",
                {
                    **OVERRIDES,
                    "model.n_layers": 4,
                    "checkpoint.init_from": str(tmp_path / "imported"),
                },
            ),
            tmp_path / "bad",
        )


def test_persistent_cache_is_turned_off_for_multi_device_cpu(tmp_path):
    import jax

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        jax.config.update("jax_enable_compilation_cache", True)
        assert jax.device_count() == 8
        loop.guard_compilation_cache()
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])
