"""`python -m deepseek_jax.schedule`: text, JSON, PNG and argument errors."""

import json
import re
import subprocess
import sys

import pytest

from deepseek_jax import schedule as cli
from deepseek_jax.parallel.pipeline import schedules


def run(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def test_table_lists_every_schedule(capsys):
    out = run(capsys, "--ranks=8", "--microbatches=20")
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {"dualpipe", "dualpipev", "1f1b", "gpipe"}
    # dualpipe at PP=8, M=20: 38 ticks, async 66 with 6 idle, lock-step 72, formula 6, live 9.
    assert rows["dualpipe"].split()[:4] == ["dualpipe", "8", "20", "38"]
    assert "|     66      6" in rows["dualpipe"] and "|     72     12" in rows["dualpipe"]
    assert rows["dualpipe"].split("|")[3].split() == ["6"]
    assert rows["dualpipe"].split("|")[4].strip().startswith("9; 10;")


def test_json_matches_generator(capsys):
    doc = json.loads(run(capsys, "--schedule=dualpipe", "--ranks=4", "--microbatches=8", "--json"))
    plan = schedules.dualpipe(4, 8)
    assert doc["ranks"] == [[op.to_json() for op in ops] for ops in plan.ranks]
    assert doc["ranks"][0][7] == {"op": "F&B", "c": 0, "m": 3, "c2": 1, "m2": 1}
    assert doc["bubble"]["async"]["makespan"] == 26 and doc["bubble"]["formula"] == 2
    assert doc["bubble"]["lockstep"]["makespan"] == 26 and doc["bubble"]["ticks"] == 16
    doc = json.loads(
        run(capsys, "--schedule=1f1b", "--ranks=4", "--microbatches=8", "--json", "--costs=F=1,B=1")
    )
    assert doc["bubble"]["formula"] == 6 and doc["costs"]["B"] == 1
    assert all(e["op"] in ("F", "B") and "c2" not in e for rank in doc["ranks"] for e in rank)


def test_png_is_written(capsys, tmp_path):
    path = tmp_path / "dualpipe.png"
    run(capsys, "--schedule=dualpipev", "--ranks=2", "--microbatches=4", f"--png={path}")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--schedule=dualpipe", "--ranks=5"], "even number of pipeline ranks"),
        (["--schedule=dualpipe", "--ranks=8", "--microbatches=10"], ">= 2\\*pp=16"),
        (["--schedule=zb"], "invalid choice"),
        (["--ranks=0"], "must be positive"),
        (["--ranks=x"], "invalid int value"),
        (["--costs=F=fast"], "not a number"),
        (["--json"], "need --schedule"),
        (["--ranks=2", "--microbatches=-3"], "must be positive"),
    ],
)
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_inapplicable_schedules_are_marked_in_the_table(capsys):
    out = run(capsys, "--ranks=3", "--microbatches=4")
    assert "dualpipe   n/a: dualpipe needs an even number" in out
    assert "1f1b         3    4" in out


def test_module_entry_point_exit_code():
    bad = subprocess.run(
        [sys.executable, "-m", "deepseek_jax.schedule", "--schedule=dualpipe", "--ranks=3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "even number" in bad.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_jax.schedule",
            "--schedule=gpipe",
            "--ranks=2",
            "--microbatches=2",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["schedule"] == "gpipe"
