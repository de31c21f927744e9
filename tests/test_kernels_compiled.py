"""The Triton kernels compiled for real GPUs, on a machine without one.

The other kernel tests run the kernels through triton's interpreter, which checks their arithmetic but never
compiles them. Here triton compiles each kernel ahead of time for NVIDIA sm_80 (A100) and sm_90 (H100), with the
launch options kernels.py uses, at the largest tiles it accepts. That catches kernels that do not compile for a GPU,
and checks that triton_shared_memory (what backend="auto" compares with the GPU's shared memory before choosing
triton) really bounds the shared memory of every compiled kernel.

The compilation runs in a subprocess: TRITON_INTERPRET=1, set for the whole test session, would turn the kernels
into interpreted functions.
"""
import json
import os
import subprocess
import sys

import pytest

from kernels import HAS_TRITON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles every kernel once at (compute dtype, P, N, chunk, sm architecture) and prints the shared memory of each.
COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels as K

dtype, P, N, C, arch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
target = GPUTarget("cuda", arch, 32)
data = "*" + dtype


def compile_kernel(kernel, pointers, constants, **options):
    # every argument not named in pointers or constants is an int32 size
    signature = {}
    for name in kernel.arg_names:
        signature[name] = "constexpr" if name in constants else pointers.get(name, "i32")
    source = ASTSource(kernel, signature, constexprs=constants)
    return triton.compile(source, target=target, options=options).metadata.shared


def compile_tile_kernel(name, pointers, **constants):
    # the tile widths and launch options kernels.py uses for this kernel
    block_p, block_n = K._tiles(name, P, N)
    constants = dict(constants, CHUNK=C, DOT_PRECISION="ieee", BLOCK_P=block_p, BLOCK_N=block_n)
    return compile_kernel(getattr(K, "_" + name + "_kernel"), pointers, constants, **K._launch_options(name, C))


f32 = "*fp32"
shared = {
    "chunk_state": compile_tile_kernel("chunk_state", dict(rows_ptr=data, cols_ptr=data, cum_ptr=f32, out_ptr=f32),
                                       WEIGHT_TO_END=True),
    "chunk_output": compile_tile_kernel(
        "chunk_output", dict(q_ptr=data, k_ptr=data, v_ptr=data, cum_ptr=f32, states_ptr=f32, y_ptr=data)),
    "grad_qk": compile_tile_kernel(
        "grad_qk", dict(q_ptr=data, k_ptr=data, v_ptr=data, dy_ptr=data, cum_ptr=f32, states_ptr=f32,
                        dstates_ptr=f32, dq_ptr=data, dk_ptr=data, dcum_ptr=f32)),
    "grad_v": compile_tile_kernel(
        "grad_v", dict(q_ptr=data, k_ptr=data, dy_ptr=data, cum_ptr=f32, dstates_ptr=f32, dv_ptr=data)),
    "state_pass": compile_kernel(
        K._state_pass_kernel, dict(states_ptr=f32, cum_ptr=f32, initial_ptr=f32, final_ptr=f32),
        dict(CHUNK=C, BLOCK=K._block(P * N, 1024), HAS_INITIAL=True), num_warps=4),
    "state_pass_backward": compile_kernel(
        K._state_pass_backward_kernel, dict(dstates_ptr=f32, states_ptr=f32, final_ptr=f32, dfinal_ptr=f32,
                                            cum_ptr=f32, dinitial_ptr=f32, end_dot_ptr=f32),
        dict(CHUNK=C, BLOCK=K._block(P * N, 1024)), num_warps=4),
}
print(json.dumps(shared))
"""


def compile_for_gpu(dtype, P, N, chunk, arch):
    """{kernel name: shared memory in bytes} of the kernels compiled for cuda sm_<arch>."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, dtype, str(P), str(N), str(chunk), str(arch)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        if "No module named 'triton.backends.nvidia'" in result.stderr:
            pytest.skip("this triton build has no NVIDIA backend")
        pytest.fail(f"compiling for sm_{arch} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON or not sys.platform.startswith("linux"), reason="needs triton's Linux wheel")
@pytest.mark.parametrize("dtype, P, N, chunk, arch", [
    ("bf16", 128, 128, 64, 90),    # the widest heads at the default chunk
    ("fp32", 128, 128, 64, 90),    # float32 doubles every tile
    ("bf16", 128, 128, 128, 90),   # the largest chunk
    ("bf16", 64, 128, 64, 80),     # the paper preset's heads (headdim 64, d_state 128) on an A100
    ("bf16", 64, 128, 16, 90),     # small chunks: the output kernel stages its state in float32
    ("fp32", 16, 16, 16, 80),      # the smallest tiles
])
def test_kernels_compile_within_the_shared_memory_bound(dtype, P, N, chunk, arch):
    from kernels import triton_shared_memory

    shared = compile_for_gpu(dtype, P, N, chunk, arch)
    bound = triton_shared_memory(P, N, chunk, element_size=2 if dtype == "bf16" else 4)
    assert set(shared) == {"chunk_state", "chunk_output", "grad_qk", "grad_v", "state_pass", "state_pass_backward"}
    assert max(shared.values()) <= bound, (shared, bound)
    # the bound should not be so loose that auto refuses sizes that fit: within 2x of the largest kernel
    assert bound <= 2 * max(shared.values()), (shared, bound)
