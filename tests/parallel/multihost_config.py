"""The 2-process test's experiment: configs/tiny.py shrunk to compile fast, sixteen steps with a
checkpoint every two, under fsdp_expert_tp on 8 devices (tensor=2 inside a process, the expert
all-to-all across the two).

    launch/local.sh 2  with CONFIG=tests/parallel/multihost_config.py DEVICES=4
"""

import importlib.util
import pathlib

_TINY = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py"


def get_config():
    spec = importlib.util.spec_from_file_location("_tiny_config", _TINY)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    # init_std 0.2 keeps router scores apart, so no near-tie top-k can differ between the runs.
    c.model.update(
        d_model=32,
        n_layers=2,
        intermediate_size=48,
        n_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        moe_intermediate_size=16,
        init_std=0.2,
    )
    c.train.update(
        steps=16,
        global_batch_size=8,
        seq_len=16,
        warmup_steps=0,
        log_every=1,
        eval_every=1000,
        eval_batches=1,
    )
    c.checkpoint.update(every_steps=2, keep_last=2)
    c.parallel.update(preset="fsdp_expert_tp", fsdp=1, expert=4, tensor=2)
    return c
