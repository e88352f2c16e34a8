"""Where the transformers DeepseekV3 training step's time goes, from torch.profiler.

Method: forward pre/post hooks open a `record_function("cat:<category>")` range around each module
of a known kind (attention, router, experts, MLP, RMSNorm, rotary embedding, embedding, lm_head),
and the step wraps the CE and the optimizer (clip + AdamW + zero_grad) in ranges of their own. An
op's self CPU time goes to the innermost range above it. Backward ops run in autograd's thread
outside any range: each `autograd::engine::evaluate_function: XBackward` event carries the
sequence number of the forward op that created its node, so it goes to that op's category. Inside
the experts, time under `grouped_mm` ops (and their backward) is the grouped matmul, the rest
(one-hot, sort, gathers, index_add) is sort/dispatch + combine, which torch does not separate.
The categories are bench/step_profile.py's.
"""

from __future__ import annotations

import collections

EXPERTS = "MoE experts"
MODULE_CATEGORIES = {
    "DeepseekV3Attention": "attention (MLA)",
    "DeepseekV3TopkRouter": "MoE routing",
    "DeepseekV3MoE": "MoE routing",  # its own glue; experts, MLP and router are nested ranges
    "DeepseekV3Experts": EXPERTS,
    "DeepseekV3MLP": "FFN (dense + shared expert)",
    "DeepseekV3RMSNorm": "norms / RoPE",
    "DeepseekV3RotaryEmbedding": "norms / RoPE",
    "Embedding": "embedding",
}


def instrument(model) -> None:
    import torch

    def add(module, cat):
        stack = []

        def pre(mod, args):
            rf = torch.profiler.record_function(f"cat:{cat}")
            rf.__enter__()
            stack.append(rf)

        def post(mod, args, out):
            stack.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for name, module in model.named_modules():
        cat = MODULE_CATEGORIES.get(type(module).__name__)
        if name == "lm_head":
            cat = "head + CE"
        if cat is not None:
            add(module, cat)


def _range_category(e):
    while e is not None:
        if e.name.startswith("cat:"):
            return e.name[4:], e
        e = e.cpu_parent
    return None, None


def _is_gmm(e, stop) -> bool:
    while e is not None and e is not stop:
        if "grouped_mm" in e.name or "GroupedMm" in e.name:
            return True
        e = e.cpu_parent
    return False


def breakdown(events, steps: int) -> dict:
    """ms per step per category from a torch.profiler event list of `steps` steps."""
    seq_cat = {}
    for e in events:
        cat, rng = _range_category(e)
        if cat is not None and e.sequence_nr >= 0:
            gmm = cat == EXPERTS and _is_gmm(e, rng)
            seq_cat.setdefault(e.sequence_nr, (cat, gmm))
    ms = collections.Counter()
    for e in events:
        cat, rng = _range_category(e)
        gmm = cat == EXPERTS and _is_gmm(e, rng)
        if cat is None:
            b = e
            while b is not None and not b.name.startswith("autograd::engine::evaluate_function"):
                b = b.cpu_parent
            if b is not None:
                cat, gmm = seq_cat.get(b.sequence_nr, ("other", False))
                gmm = gmm or _is_gmm(e, None)
        if cat == EXPERTS:
            cat = "MoE grouped matmul" if gmm else "MoE sort/dispatch"
        ms[cat or "other"] += e.self_cpu_time_total / 1e3
    return {k: v / steps for k, v in ms.items()}
