"""What the compiled F&B branch can overlap: the scheduled HLO of the pipelined step.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python bench/pipeline_overlap.py [--config=configs/tiny.py] [--pipe=2] [--expert=2]

Compiles the DualPipe step, finds the lax.switch in the tick loop and, in its F&B branch, lists the
scheduled top-level instructions (the order XLA runs them) labelled by the half they come from
(named scopes pp_forward / pp_backward), with their kind (loop, conditional, fusion, collective).
Then it counts how often the schedule alternates between the halves and which collectives sit in
the branch. On GPU, run the same with the real mesh: async collectives appear as *-start/*-done
pairs and the instructions scheduled between a pair are what hides it.
"""

from __future__ import annotations

import argparse
import re

import jax
import numpy as np

from deepseek_jax import config as config_lib
from deepseek_jax.batch import Batch
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel.pipeline.schedules import Schedule
from deepseek_jax.parallel.pipeline.ticks import Code
from deepseek_jax.train import optim, pipeline_step, sharded
from deepseek_jax.train import state as state_lib

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*)$")


def computations(hlo: str) -> dict[str, list[str]]:
    out, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            out[name] = []
        elif name and line.startswith("  "):
            out[name].append(line)
    return out


def fb_branch(hlo: str, index: int) -> list[str]:
    """The instructions of the switch's branch `index` inside the while loop of the tick scan."""
    comps = computations(hlo)
    for lines in comps.values():
        for line in lines:
            if " conditional(" in line and "branch_computations={" in line:
                branches = re.search(r"branch_computations=\{([^}]*)\}", line).group(1)
                names = [b.strip().lstrip("%") for b in branches.split(",")]
                if len(names) > index:
                    return comps[names[index]]
    raise ValueError("no conditional with enough branches found")


def label(line: str) -> str:
    op = re.search(r'op_name="([^"]*)"', line)
    name = op.group(1) if op else ""
    return "F" if "pp_forward" in name else "B" if "pp_backward" in name else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--pipe", type=int, default=2, help="pipeline ranks")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--layers-per-stage", type=int, default=1)
    ap.add_argument("--expert", type=int, default=1, help="expert-parallel ranks in a stage")
    args = ap.parse_args()
    base = config_lib.load(args.config)
    exp = config_lib.load(
        args.config,
        {
            "parallel.pipe": args.pipe,
            "parallel.pipeline": "dualpipe",
            "parallel.microbatches": args.microbatches,
            "parallel.expert": args.expert,
            "parallel.data": 1,
            "parallel.preset": "data_expert" if args.expert > 1 else "data",
            "model.n_layers": base.model.n_dense_layers + args.pipe * args.layers_per_stage,
        },
    )
    graphdef, _, _ = state_lib.abstract_model(exp.model)
    tx = optim.optimizer(exp.train)
    n = args.pipe * args.expert
    plan = plan_lib.make_plan(
        exp.parallel, exp.model, exp.train.global_batch_size, jax.devices()[:n]
    )
    pipe = pipeline_step.build(
        Schedule.DUALPIPE, args.pipe, args.microbatches, graphdef, exp.model, experts=plan.experts()
    )
    step = pipeline_step.make_train_step(pipe, plan.mesh, exp.train, tx)
    state = sharded.abstract_state(plan, exp.model, tx)
    B, S = exp.train.global_batch_size, exp.train.seq_len
    struct = jax.ShapeDtypeStruct((B, S), np.int32, sharding=plan.batch_sharding())
    batch = Batch(inputs=struct, targets=struct, loss_mask=struct)
    hlo = jax.jit(plan.wrap(step)).lower(state, batch, pipe.tables()).compile().as_text()
    lines = fb_branch(hlo, pipe.layout.codes.index(Code.FB))
    seq = []
    for line in lines:
        m = _INSTR.match(line)
        if not m or m.group(2) in (
            "parameter",
            "constant",
            "get-tuple-element",
            "tuple",
            "bitcast",
        ):
            continue
        seq.append((label(line), m.group(2), m.group(1)))
    halves = [s for s in seq if s[0] != "-"]
    switches = sum(1 for a, b in zip(halves, halves[1:]) if a[0] != b[0])
    print(
        f"F&B branch: {len(seq)} scheduled instructions, {sum(s[0] == 'F' for s in seq)} from "
        f"the forward half, {sum(s[0] == 'B' for s in seq)} from the backward half, "
        f"{switches} alternations between halves"
    )
    runs = []  # the schedule as runs of one half: F x12, B x3, ...
    for lab, _, _ in halves:
        if runs and runs[-1][0] == lab:
            runs[-1][1] += 1
        else:
            runs.append([lab, 1])
    print("order:", " ".join(f"{lab}x{n}" for lab, n in runs))
    for i, (lab, kind, name) in enumerate(seq):
        if kind in ("while", "conditional", "call") or "all-" in kind or "collective" in kind:
            print(f"  [{i:4d}] {lab} {kind:22s} {name}")


if __name__ == "__main__":
    main()
