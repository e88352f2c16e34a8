"""bench/fp8_step.py's census of FP8 GEMMs in optimized HLO text, on a hand-written module in the
shapes XLA:GPU prints (no GPU here): a cuBLASLt FP8 custom-call, a plain cuBLAS GEMM, a dot with
f8 operands, a fusion that dequantizes f8 into a wider dot, and an f8 value the module computes."""

from bench import fp8_step

GPU_HLO = """
HloModule jit_step, entry_computation_layout={(f8e4m3fn[16,128]{1,0})->f32[16,32]{1,0}}

%fused_dequant_dot (p0: f8e4m3fn[16,128], p1: bf16[128,32]) -> f32[16,32] {
  %p0 = f8e4m3fn[16,128]{1,0} parameter(0)
  %p1 = bf16[128,32]{1,0} parameter(1)
  %c = bf16[16,128]{1,0} convert(%p0), metadata={op_name="convert_element_type"}
  ROOT %d = f32[16,32]{1,0} dot(%c, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_scale (q0: f8e4m3fn[16,128]) -> f32[16,128] {
  %q0 = f8e4m3fn[16,128]{1,0} parameter(0)
  ROOT %u = f32[16,128]{1,0} convert(%q0)
}

ENTRY %main (a: f8e4m3fn[16,128], b: f8e4m3fn[128,32], w: bf16[128,32]) -> f32[16,32] {
  %a = f8e4m3fn[16,128]{1,0} parameter(0)
  %b = f8e4m3fn[128,32]{1,0} parameter(1)
  %w = bf16[128,32]{1,0} parameter(2)
  %s = f32[] constant(1)
  %g = (f32[16,32], s8[0]) custom-call(%a, %b, %s), custom_call_target="__cublas$lt$matmul$f8"
  %h = (bf16[16,32], s8[0]) custom-call(%w, %w), custom_call_target="__cublas$gemm"
  %x = f32[16,32]{1,0} dot(f8e4m3fn[16,128]{1,0} %a, f8e4m3fn[128,32]{1,0} %b), lhs_batch_dims={}
  %v = f32[16,128]{1,0} fusion(%a), kind=kLoop, calls=%fused_scale
  %q = f8e4m3fn[16,128]{1,0} convert(%v)
  ROOT %y = f32[16,32]{1,0} fusion(%a, %w), kind=kCustom, calls=%fused_dequant_dot
}
"""


def test_census_counts_each_kind_of_gemm():
    assert fp8_step.hlo_census(GPU_HLO) == {
        "dots": 2,  # the entry's and the fused one
        "f8_dots": 1,  # the fused dot reads the converted (bf16) operand
        "gemm_custom_calls": 2,
        "f8_gemm_custom_calls": 1,
        "f8_fed_gemm_fusions": 1,  # %fused_scale takes f8 but has no dot
        "f8_values": 1,  # %q: a quantized value computed here (parameters are not counted)
    }
