"""`python -m deepseek_jax.info` as a cost estimator: the V3 table as printed, and every bad input
one `error:` line naming the flag, exit status 2. Runs the tool's main in this process."""

import json

import pytest

from deepseek_jax import cli, errors, info

V3 = "--config=configs/deepseek_v3_671b.py"


def run(argv, capsys):
    capsys.readouterr()
    try:
        cli.parse_flags(["deepseek_jax.info", V3, *argv])
        errors.guard(info.main)([])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_v3_report_table(capsys):
    code, out, _ = run(
        [
            "--device=h800",
            "--phase=pretrain:4096:14.8T:0.4065",
            "--phase=ext-32k:32768:1920x1000:0.2534",
            "--phase=ext-128k:131072:480x1000:0.2534",
            "--add_hours=post-training:5e3",
            "--num_devices=2048",
            "--price=2",
        ],
        capsys,
    )
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert "2,664.2K" in lines["pretrain"] and "180.0K" in lines["pretrain"]
    assert "54.2" in lines["pretrain"] and "$5.328M" in lines["pretrain"]
    assert lines["total"][1:] == ["2,788.2K", "56.7", "$5.576M"]


def test_inverse_mode(capsys):
    code, out, _ = run(["--device=h800", "--tokens=14.8e12", "--gpu_hours=2664e3"], capsys)
    assert code == 0
    assert "40.65% (39.06% without MTP)" in out and "402.2 TFLOP/s per GPU" in out


def test_the_peak_follows_the_runs_matmul_policy(capsys):
    # V3 trained in FP8: against the FP8 peak its hours imply half the BF16-peak MFU
    fp8 = ["--device=h800", "--tokens=14.8e12", "--gpu_hours=2664e3"]
    fp8 += ["--config.model.matmul_policy=fp8_blockwise"]
    code, out, _ = run(fp8, capsys)
    assert code == 0 and "dense FP8 peak 1978.9 TFLOP/s" in out
    assert "--peak=auto: model.matmul_policy=fp8_blockwise" in out and "20.33%" in out
    code, out, _ = run([*fp8, "--peak=bf16"], capsys)
    assert code == 0 and "dense BF16 peak 989.4 TFLOP/s, --peak=bf16): 40.65%" in out
    code, out, _ = run([fp8[0], fp8[1], fp8[3], "--mfu=0.2033", "--json"], capsys)
    d = json.loads(out)
    assert d["peak"] == "fp8" and d["peak_flops_per_device"] == 1978.9e12


def test_json(capsys):
    code, out, _ = run(["--device=v5p", "--tokens=1T", "--mfu=0.5", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["device"] == "TPU v5p"
    assert d["device_hours"] == pytest.approx(1e12 * 260.64e9 / (0.5 * 459e12 * 3600), rel=1e-4)


def _bench(tmp_path, **fields):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fields))
    return str(path)


def test_measured_mfu_from_a_gpu_bench_is_rebased_on_the_vendor_peak(tmp_path, capsys):
    # the keys bench/train_step.py writes
    path = _bench(
        tmp_path,
        config="configs/small.py",
        device="NVIDIA H100 80GB HBM3",
        devices=8,
        seq_len=4096,
        model_flops_per_s=8 * 395.76e12,
        matmul_peak_flops_per_s=8 * 700e12,
        mfu=0.5654,
    )
    code, out, _ = run(
        ["--device=h800", "--tokens=14.8T", "--mfu=measured", f"--bench_json={path}", "--json"],
        capsys,
    )
    d = json.loads(out)
    assert code == 0 and d["phases"][0]["mfu"] == pytest.approx(0.4, rel=1e-12)
    assert "8 x H100 SXM bf16 peak" in d["mfu_source"]


def test_measured_mfu_from_cpu_bench_and_from_metrics(tmp_path, capsys):
    path = _bench(tmp_path, device="cpu", devices=1, model_flops_per_s=1e10, mfu=0.25)
    code, out, _ = run(
        ["--device=h800", "--tokens=1T", "--mfu=measured", f"--bench_json={path}", "--json"],
        capsys,
    )
    assert code == 0 and json.loads(out)["phases"][0]["mfu"] == 0.25
    metrics = tmp_path / "metrics.jsonl"
    records = [{"split": "train", "mfu": m} for m in (0.01, 0.3, 0.31, 0.35)]
    records.append({"split": "eval", "eval_loss": 2.0})
    metrics.write_text("\n".join(json.dumps(r) for r in records))
    code, out, _ = run(
        ["--device=h800", "--tokens=1T", "--mfu=measured", f"--bench_json={metrics}", "--json"],
        capsys,
    )
    assert code == 0 and json.loads(out)["phases"][0]["mfu"] == 0.31  # first interval dropped


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device=h900", "--tokens=1T", "--mfu=0.4"], "--device=h900: unknown device"),
        (["--tokens=1T", "--mfu=0.4"], "--device is required"),
        (["--device=h800", "--tokens=-1e12", "--mfu=0.4"], "--tokens=-1e12: tokens must be > 0"),
        (["--device=h800", "--tokens=1T", "--mfu=0"], r"--mfu=0: MFU must be in (0, 1]"),
        (["--device=h800", "--tokens=1T", "--mfu=1.2"], r"--mfu=1.2: MFU must be in (0, 1]"),
        (["--device=h800", "--tokens=1T"], "--phase seq 4096: no MFU"),
        (["--device=h800", "--phase=4096"], "--phase=4096: expected [NAME:]SEQ_LEN:TOKENS"),
        (["--device=h800", "--phase=4096:1T:2"], "--phase=4096:1T:2: MFU must be in (0, 1]"),
        (["--device=h800", "--mfu=0.4"], "give the tokens to train on"),
        (["--device=h800", "--tokens=1T", "--phase=4096:1T"], "--tokens and --phase"),
        (["--device=h800", "--tokens=1T", "--gpu_hours=0"], "--device_hours=0: device-hours must"),
        (["--device=h800", "--tokens=1T", "--gpu_hours=1e3", "--mfu=0.4"], "drop --mfu"),
        (["--device=h800", "--tokens=1T", "--mfu=measured"], "--bench_json=FILE"),
        (
            ["--device=h800", "--tokens=1T", "--mfu=measured", "--bench_json=/nonexistent.json"],
            "--bench_json=/nonexistent.json: no such file",
        ),
        (["--device=h800", "--tokens=1T", "--mfu=0.4", "--price=-2"], "flag --price=-2"),
        (["--device=h800", "--tokens=1T", "--mfu=0.4", "--num_devices=0"], "flag --num_devices=0"),
        (["--device=h800", "--tokens=1T", "--mfu=0.4", "--add_hours=5e3"], "--add_hours=5e3: "),
        (["--device=h800", "--tokens=1T", "--mfu=0.4", "--peak=fp4"], "flag --peak=fp4"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == errors.EXIT_BAD_INPUT and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_bench_json(tmp_path, capsys):
    for content, message in [
        ("{}", '"mfu"'),
        ("not json", "Expecting value"),
        ('{"mfu": 3}', "(0, 1]"),
    ]:
        path = tmp_path / "b.json"
        path.write_text(content)
        code, _, err = run(
            ["--device=h800", "--tokens=1T", "--mfu=measured", f"--bench_json={path}"], capsys
        )
        assert code == 2 and err.startswith(f"error: --bench_json={path}: ") and message in err
