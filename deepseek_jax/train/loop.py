"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, preemption.

Resumes from the newest good checkpoint in `<workdir>/checkpoints/` (state, data-iterator position,
config); otherwise initialises (or loads `checkpoint.init_from`). With `sft.source` set the data and
the evaluation are those of supervised fine-tuning (train/sft.py); everything else is the same.
Step n's metrics are read after step n+1 has been dispatched, so the host never stalls the
device; a run of non-finite steps longer than `train.max_nonfinite_in_a_row` stops with the step,
the metric and the batch named.
Everything runs on the mesh of `exp.parallel` (parallel/plan.py; the state and the steps on it come
from train/sharded.py): the state is created or restored sharded, each process loads only its rows
of every batch, and metrics come back replicated.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np

from deepseek_jax import config as config_lib
from deepseek_jax import data as data_lib
from deepseek_jax import errors
from deepseek_jax.cost import devices, estimate
from deepseek_jax.model import config as model_config
from deepseek_jax.model import counting
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import config_diff, init_from, optim, preemption, sft, sharded
from deepseek_jax.train import metrics as metrics_lib
from deepseek_jax.train import progress as progress_lib
from deepseek_jax.train import state as state_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


def host_peak_flops() -> float:
    """Measured dense-matmul FLOP/s of this host's default backend (MFU denominator on CPU)."""
    n = 1024
    x = jax.numpy.ones((n, n), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < 0.5:
        f(x).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t)


def peak_flops(policy: model_config.MatmulPolicy) -> tuple[float, str]:
    """(FLOP/s, what it is): the MFU denominator. On a catalogued chip the dense peak of all
    devices in the format of the run's weight GEMMs (FP8 under an FP8 matmul policy, BF16
    otherwise; cost.estimate.peak_for, as the cost estimate's --peak=auto), else the measured
    matmul rate of the hosts (CPU, where FP8 is emulated and has no peak of its own)."""
    dev = devices.for_device_kind(jax.devices()[0].device_kind)
    if dev is not None:
        peak, why = estimate.peak_for(policy)
        return dev.peak(peak) * jax.device_count(), (
            f"{jax.device_count()} x {dev.name} dense {peak.value.upper()} peak ({why})"
        )
    return host_peak_flops() * jax.process_count(), "the measured matmul rate of this host"


class Evaluator:
    def __init__(self, exp: config_lib.ExperimentConfig, graphdef, plan: plan_lib.Plan, tx):
        t = exp.train
        self.plan, self.batch_size = plan, t.global_batch_size
        index, count = plan.data_shard(t.global_batch_size)
        self.batches = data_lib.make_eval_iterator(
            exp.data,
            seq_len=t.seq_len,
            batch_size=t.global_batch_size,
            model_vocab_size=exp.model.vocab_size,
            num_batches=t.eval_batches or None,
            process_index=index,
            process_count=count,
        )
        self.fn = sharded.eval_step(plan, exp.model, graphdef, tx)

    def __call__(self, state: state_lib.TrainState) -> dict[str, float]:
        sums = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in self.batches:
            out = self.fn(
                state.params, state.expert_bias, self.plan.global_batch(batch, self.batch_size)
            )
            for k in sums:
                sums[k] += float(out[k])
        loss = sums["nll_sum"] / max(sums["tokens"], 1.0)
        bpb = sums["nll_sum"] / math.log(2) / max(sums["bytes"], 1.0)
        return {"eval_loss": loss, "eval_bpb": bpb, "eval_tokens": sums["tokens"]}


class _Interval:
    """Host-side accumulation of per-step metrics between log lines."""

    def __init__(self):
        self.reset(time.perf_counter())

    def reset(self, now: float):
        self.start, self.steps, self.finite, self.sums, self.load = now, 0, 0, {}, None

    def add(self, m: dict[str, np.ndarray]):
        self.finite += 1
        for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
            if k in m:
                self.sums[k] = self.sums.get(k, 0.0) + float(m[k])
        if "expert_load" in m:
            self.load = m["expert_load"] if self.load is None else self.load + m["expert_load"]


def guard_compilation_cache() -> None:
    """Turns JAX's persistent compilation cache off for multi-device CPU runs, with a warning.

    On jax 0.10.2 an XLA:CPU executable of the sharded step loaded back from the persistent cache
    deadlocks in its collectives (devices disagree on the next collective; the rendezvous aborts
    the process after 40 s). Freshly compiled executables are fine.
    """
    if (
        jax.config.jax_enable_compilation_cache
        and jax.config.jax_compilation_cache_dir
        and jax.default_backend() == "cpu"
        and jax.device_count() > 1
    ):
        log.warning(
            "persistent compilation cache disabled: cached multi-device XLA:CPU "
            "executables deadlock in collectives on this jax version"
        )
        jax.config.update("jax_enable_compilation_cache", False)


def _eval_line(m: dict[str, float]) -> str:
    line = f"held-out {m['eval_loss']:.4f} nats/token, {m['eval_bpb']:.4f} bits/byte"
    if "eval_exact_match" in m:
        line += f", greedy exact match {m['eval_exact_match']:.1%}"
    return line


def run(exp: config_lib.ExperimentConfig, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains to exp.train.steps (resuming if possible); returns a summary for callers and tests."""
    guard_compilation_cache()
    workdir = pathlib.Path(workdir)
    sft_data = None
    if exp.sft.enabled:  # read and pack every conversation before anything else: errors first
        tokenizer, corpus = sft.load_corpus(exp)
        rows = sft.pack(exp, tokenizer, corpus.train)
        exp = sft.resolve(exp, rows["inputs"].shape[0])
        sft_data = (tokenizer, corpus, rows)
    config_diff.check_resume(workdir, exp)  # a different model: fail before touching anything
    workdir.mkdir(parents=True, exist_ok=True)
    t, pid = exp.train, jax.process_index()
    tx = optim.optimizer(t)
    graphdef, _, _ = state_lib.abstract_model(exp.model)
    # Mesh, shardings and every layout check, before any compile.
    with errors.as_user_error(ValueError):  # make_plan only validates and raises ValueError
        plan = plan_lib.make_plan(exp.parallel, exp.model, t.global_batch_size)

    # Each process loads only the rows its devices hold (see Plan.data_shard).
    data_index, data_count = plan.data_shard(t.global_batch_size)
    if sft_data is not None:
        tokenizer, corpus, rows = sft_data
        train_iter = sft.Data(
            rows,
            global_batch=t.global_batch_size,
            process_index=data_index,
            process_count=data_count,
            seed=t.seed,
            pad_id=tokenizer.pad_id,
            fingerprint=corpus.fingerprint,
        )
        evaluate = sft.Evaluator(exp, graphdef, plan, tx, tokenizer, corpus)
        print(
            f"sft: {len(corpus.train)} samples packed into {train_iter.num_rows} rows, "
            f"{train_iter.batches_per_epoch} steps per epoch, {t.steps} steps",
            flush=True,
        )
    else:
        train_iter = data_lib.make_train_iterator(
            exp.data,
            seq_len=t.seq_len,
            global_batch_size=t.global_batch_size,
            model_vocab_size=exp.model.vocab_size,
            seed=t.seed,
            process_index=data_index,
            process_count=data_count,
        )
        evaluate = Evaluator(exp, graphdef, plan, tx)

    guard = preemption.PreemptionGuard().install()
    ckpt = checkpoint_lib.Checkpointer(
        workdir, keep_last=exp.checkpoint.keep_last, keep_every=exp.checkpoint.keep_every or None
    )
    abstract = sharded.abstract_state(plan, exp.model, tx)  # restores into the shardings
    restored = ckpt.restore(None, abstract)
    if restored is not None:
        state, step = restored.state, restored.step
        if restored.data is not None:
            train_iter.set_state(restored.data)
        else:
            log.warning(
                "checkpoint %d has no data state for %d processes: the data order restarts",
                step,
                jax.process_count(),
            )
        print(f"resumed from step {step} ({workdir / 'checkpoints' / str(step)})", flush=True)
    else:
        state, step = sharded.init_state(plan, exp.model, tx, t.seed), 0
        if exp.checkpoint.init_from:
            state = init_from.load_into(state, exp.model, exp.checkpoint.init_from)
            print(f"initialised parameters from {exp.checkpoint.init_from}", flush=True)

    train_step = sharded.train_step(plan, exp.model, t, graphdef, tx)
    counts = counting.count(exp.model, t.seq_len)
    peak, peak_what = peak_flops(exp.model.matmul_policy)
    writer = metrics_lib.MetricsWriter(workdir, process_index=pid)
    bar = progress_lib.Progress(t.steps, log_every=t.log_every, process_index=pid)
    n_moe = exp.model.n_moe_layers + (exp.model.mtp_depth if exp.model.mtp_is_moe else 0)
    moe_ids = list(range(exp.model.n_dense_layers, exp.model.n_layers)) + [
        exp.model.n_layers + k for k in range(n_moe - exp.model.n_moe_layers)
    ]
    config_json = exp.to_dict()

    summary: dict[str, Any] = {"start_step": step, "mfu_peak": peak_what}
    bar.message(f"MFU against {peak_what}")
    if step == 0:
        first = evaluate(state)
        writer.write(0, first, split="eval")
        summary["eval_bpb_start"] = first["eval_bpb"]
        bar.message(f"step 0: {_eval_line(first)}")

    interval, skipped, streak, pending = _Interval(), 0, 0, None
    tokens_per_step = t.global_batch_size * t.seq_len

    def consume(done_step: int, m, data_state) -> None:
        nonlocal skipped, streak
        m = jax.device_get(m)
        interval.steps += 1
        if int(m["skipped"]):
            skipped += 1
            streak += 1
            bad = "loss" if not bool(m["loss_finite"]) else "grad_norm"
            if streak >= t.max_nonfinite_in_a_row:
                raise NonFiniteError(
                    f"step {done_step}: {bad} is not finite ({streak} steps in a row, limit "
                    f"train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); the batch was "
                    f"global batch #{done_step - 1} of this run, data state before it: "
                    f"{json.dumps(data_state)}"
                )
        else:
            streak = 0
            interval.add(m)
        if done_step % t.log_every == 0 or done_step == t.steps:
            now = time.perf_counter()
            n = max(interval.finite, 1)
            tps = interval.steps * tokens_per_step / max(now - interval.start, 1e-9)
            record = {k: v / n for k, v in interval.sums.items()}
            record.update(
                lr=float(m["lr"]),
                tokens_per_s=tps,
                mfu=tps * counts.train_flops_per_token / peak,
                skipped_steps=skipped,
            )
            if interval.load is not None:
                record["expert_load"] = (interval.load / n).tolist()
                record["moe_layer_ids"] = moe_ids
                record["load_max_over_mean"] = float(np.mean(m["load_max_over_mean"]))
            if "bias_norm" in m:
                record["expert_bias_norm"] = np.asarray(m["bias_norm"]).tolist()
            writer.write(done_step, record)
            bar.update(done_step, loss=record.get("loss"), tokens_per_s=tps)
            interval.reset(now)

    try:
        while step < t.steps:
            data_state = train_iter.get_state()
            batch = plan.global_batch(next(train_iter), t.global_batch_size)
            state, m = train_step(state, batch)
            step += 1
            if pending is not None:
                consume(*pending)
            pending = (step, m, data_state)
            if step % t.eval_every == 0 and step < t.steps:
                consume(*pending)
                pending = None
                m_eval = evaluate(state)
                writer.write(step, m_eval, split="eval")
                if exp.sft.enabled:
                    bar.message(f"step {step}: {_eval_line(m_eval)}")
            if step % exp.checkpoint.every_steps == 0 or step == t.steps:
                ckpt.save(step, state, data=train_iter.get_state(), config=config_json)
            if guard.should_stop(step):
                if pending is not None:
                    consume(*pending)
                ckpt.save(step, state, data=train_iter.get_state(), config=config_json, wait=True)
                bar.message(f"stopping at step {step} ({guard.reason}); checkpoint saved")
                summary.update(preempted=True, step=step)
                return summary
        if pending is not None:
            consume(*pending)
        last = evaluate(state)
        writer.write(step, last, split="eval")
        summary.update(
            step=step,
            eval_bpb_end=last["eval_bpb"],
            eval_loss_end=last["eval_loss"],
            skipped_steps=skipped,
            preempted=False,
        )
        if "eval_exact_match" in last:
            summary["eval_exact_match_end"] = last["eval_exact_match"]
        bar.message(f"step {step}: {_eval_line(last)}")
        if "eval_bpb_start" in summary:
            bar.message(
                f"held-out bits/byte: {summary['eval_bpb_start']:.4f} at step 0 -> "
                f"{last['eval_bpb']:.4f} at step {step}"
            )
        return summary
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
        guard.uninstall()
        bar.close()
        writer.close()
