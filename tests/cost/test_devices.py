"""The accelerator catalogue: names, jax device kinds, and the peaks the MFU divides by."""

import pytest

from deepseek_jax import errors
from deepseek_jax.cost import devices


@pytest.mark.parametrize(
    "name, key",
    [
        ("h800", "h800"),
        ("H800", "h800"),
        ("NVIDIA H100-SXM", "h100"),
        ("h100_pcie", "h100pcie"),
        ("tpu-v5p", "v5p"),
        ("TPU v6e", "v6e"),
        ("trillium", "v6e"),
        ("TPU7x", "7x"),
        ("ironwood", "7x"),
    ],
)
def test_names_and_aliases(name, key):
    assert devices.get(name) is devices.CATALOGUE[key]


def test_unknown_device_names_the_flag_and_the_closest_entry():
    with pytest.raises(
        errors.UserError, match=r"--device=h8000: unknown device \(did you mean h800"
    ):
        devices.get("h8000")


@pytest.mark.parametrize(
    "kind, name",
    [
        ("NVIDIA H800", "H800 SXM"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GB200", "GB200"),
        ("TPU v5", "TPU v5p"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v6 lite", "TPU v6e"),
        ("TPU7x", "TPU7x"),
    ],
)
def test_jax_device_kinds(kind, name):
    assert devices.for_device_kind(kind).name == name


def test_uncatalogued_kind_is_none():
    assert devices.for_device_kind("cpu") is None


def test_peaks():
    cat = devices.CATALOGUE
    # H800 is H100 SXM's compute (export variant: only NVLink and FP64 were cut)
    for key in ("h800", "h200"):
        assert (cat[key].bf16, cat[key].fp8) == (cat["h100"].bf16, cat["h100"].fp8)
    assert cat["h800"].peak(devices.Peak.BF16) == 989.4e12
    for key in ("h800", "b200", "gb200", "7x"):
        assert cat[key].fp8 == pytest.approx(2 * cat[key].bf16, rel=1e-3)
    for key in ("v5p", "v6e", "v5e", "v4", "a100"):  # FP8 at the BF16 rate, or no FP8 units
        assert cat[key].fp8 == cat[key].bf16
    assert {d.kind for d in cat.values()} == {"GPU", "TPU"}
