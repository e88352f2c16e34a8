"""python -m deepseek_jax.generate: outputs, streaming, bad input named before the model loads."""

import dataclasses
import json

import numpy as np
import pytest

from deepseek_jax import generate
from deepseek_jax.infer import generation, load
from deepseek_jax.model import config as config_lib
from tests.convert import helpers

BYTE_CFG = config_lib.ModelConfig(
    vocab_size=258,
    d_model=32,
    n_layers=2,
    first_k_dense_replace=1,
    intermediate_size=64,
    n_heads=2,
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    mtp_depth=1,
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    helpers.save_state(root / "mtp", BYTE_CFG, helpers.random_state(BYTE_CFG, seed=1))
    no_mtp = dataclasses.replace(BYTE_CFG, mtp_depth=0)
    helpers.save_state(root / "plain", no_mtp, helpers.random_state(no_mtp, seed=1))
    return root


def main(capsys, *argv):
    rc = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_text_prompt_streams_and_matches_the_library(ckpts, capsys):
    rc, out, err = main(
        capsys,
        "--checkpoint",
        ckpts / "mtp",
        "--prompt",
        "def f(x):",
        "--max-new-tokens",
        8,
        "--eos-id",
        -1,
    )
    assert rc == 0, err
    text, summary = out.rstrip("\n").rsplit("\n", 1)
    cfg, arrays, _ = load.load(ckpts / "mtp", with_mtp=False)
    gen = generation.Generator(
        *load.build(cfg, arrays), generation.GenerateConfig(max_new_tokens=8)
    )
    ids = gen.generate([np.frombuffer(b"def f(x):", np.uint8).astype(np.int32)]).tokens[0]
    want = bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")
    assert text == "def f(x):" + want
    assert "tokens/s" in summary


def test_prompt_tokens_to_npy_and_jsonl_speculative(ckpts, capsys, tmp_path):
    tokens = (np.arange(3 * 6).reshape(3, 6) * 7 % 256).astype(np.int64)
    np.save(tmp_path / "p.npy", tokens)
    rc, out, err = main(
        capsys,
        "--checkpoint",
        ckpts / "mtp",
        "--prompt-tokens",
        tmp_path / "p.npy",
        "--max-new-tokens",
        5,
        "--eos-id",
        -1,
        "--out",
        tmp_path / "o.npy",
    )
    assert rc == 0, err
    plain = np.load(tmp_path / "o.npy")
    assert plain.dtype == np.int32 and plain.shape == (3, 5) and (plain >= 0).all()
    rc, out, err = main(
        capsys,
        "--checkpoint",
        ckpts / "mtp",
        "--prompt-tokens",
        tmp_path / "p.npy",
        "--max-new-tokens",
        5,
        "--eos-id",
        -1,
        "--speculative",
        "mtp",
        "--draft-tokens",
        2,
        "--out",
        tmp_path / "o.jsonl",
    )
    assert rc == 0, err
    assert "acceptance per draft position" in out and "mean accepted length" in out
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == plain.tolist()  # greedy speculative = plain greedy
    assert all(isinstance(r["text"], str) for r in rows)


BAD = [
    (["--max-new-tokens", 0], "--max-new-tokens"),
    (["--temperature", -1], "--temperature"),
    (["--top-p", 0], "--top-p"),
    (["--top-p", 1.5], "--top-p"),
    (["--top-k", -2], "--top-k"),
    (["--speculative", "mtp", "--draft-tokens", 0], "--draft-tokens"),
    (["--steps-per-call", 0], "--steps-per-call"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_flags(ckpts, capsys, extra, needle):
    rc, out, err = main(
        capsys, "--checkpoint", ckpts / "mtp", "--prompt", "x", "--max-new-tokens", 4, *extra
    )
    assert rc == 2 and needle in err and err.count("\n") == 1


def test_bad_inputs(ckpts, capsys, tmp_path):
    def check(needle, *argv):
        rc, out, err = main(capsys, *argv)
        assert rc == 2 and needle in err and err.count("\n") == 1, err

    check(
        "--speculative=mtp",
        "--checkpoint",
        ckpts / "plain",
        "--prompt",
        "x",
        "--max-new-tokens",
        4,
        "--speculative",
        "mtp",
    )
    check(
        "--checkpoint", "--checkpoint", tmp_path / "nowhere", "--prompt", "x", "--max-new-tokens", 4
    )
    np.save(tmp_path / "big.npy", np.full((1, 3), 300))
    check(
        "outside the vocabulary",
        "--checkpoint",
        ckpts / "mtp",
        "--prompt-tokens",
        tmp_path / "big.npy",
        "--max-new-tokens",
        4,
    )
    np.save(tmp_path / "long.npy", np.zeros((1, 4097), np.int64))
    check(
        "longer than the model's 4096 positions",
        "--checkpoint",
        ckpts / "mtp",
        "--prompt-tokens",
        tmp_path / "long.npy",
        "--max-new-tokens",
        4,
    )
    (tmp_path / "exists.npy").write_bytes(b"keep")
    check(
        "already exists",
        "--checkpoint",
        ckpts / "mtp",
        "--prompt",
        "x",
        "--max-new-tokens",
        4,
        "--out",
        tmp_path / "exists.npy",
    )
    assert (tmp_path / "exists.npy").read_bytes() == b"keep"
