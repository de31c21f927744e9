"""The Triton kernels compiled for real GPUs, on a machine without one.

The other kernel tests run the kernels through triton's interpreter, which checks their arithmetic but never
compiles them. Here triton compiles each kernel, those of the scalar and of the per-channel decay, ahead of time for
NVIDIA sm_80 (A100) and sm_90 (H100), with the launch options scan_kernels.py uses, at the largest tiles it accepts. That
catches kernels that do not compile for a GPU, and checks that triton_shared_memory (what backend="auto" compares
with the GPU's shared memory before choosing triton) really bounds the shared memory of every compiled kernel.

The compilation runs in a subprocess: TRITON_INTERPRET=1, set for the whole test session, would turn the kernels
into interpreted functions.
"""
import json
import os
import subprocess
import sys

import pytest

from scan_kernels import HAS_TRITON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles every kernel once at (compute dtype, P, N, chunk, sm architecture) and prints the shared memory of each.
COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import scan_kernels as K

dtype, P, N, C, arch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
decays = sys.argv[6].split(",")  # which kernels: those of the "scalar" decay, of the "per-channel" one, or both
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
    # the tile widths and launch options scan_kernels.py uses for this kernel
    block_p, block_n = K._tiles(name, P, N)
    constants = dict(constants, CHUNK=C, DOT_PRECISION="ieee", BLOCK_P=block_p, BLOCK_N=block_n)
    return compile_kernel(getattr(K, "_" + name + "_kernel"), pointers, constants, **K._launch_options(name, C))


f32 = "*fp32"
shared = {}
states = dict(rows_ptr=data, cols_ptr=data, cum_ptr=f32, out_ptr=f32)
passes = {"state_pass": (K._state_pass_kernel, dict(states_ptr=f32, cum_ptr=f32, initial_ptr=f32, final_ptr=f32),
                         dict(HAS_INITIAL=True)),
          "state_pass_backward": (K._state_pass_backward_kernel,
                                  dict(dstates_ptr=f32, states_ptr=f32, final_ptr=f32, dfinal_ptr=f32, cum_ptr=f32,
                                       dinitial_ptr=f32, end_dot_ptr=f32), {})}
for decay in decays:
    per_channel = decay == "per-channel"
    suffix = "_per_channel" if per_channel else ""
    shared["chunk_state" + suffix] = compile_tile_kernel("chunk_state", states, WEIGHT_TO_END=True,
                                                         PER_CHANNEL=per_channel)
    for name, (kernel, pointers, constants) in passes.items():
        constants = dict(constants, CHUNK=C, BLOCK=K._block(P * N, 1024), PER_CHANNEL=per_channel)
        shared[name + suffix] = compile_kernel(kernel, pointers, constants, num_warps=4)
if "scalar" in decays:
    shared["chunk_output"] = compile_tile_kernel(
        "chunk_output", dict(q_ptr=data, k_ptr=data, v_ptr=data, cum_ptr=f32, states_ptr=f32, y_ptr=data))
    shared["grad_qk"] = compile_tile_kernel(
        "grad_qk", dict(q_ptr=data, k_ptr=data, v_ptr=data, dy_ptr=data, cum_ptr=f32, states_ptr=f32,
                        dstates_ptr=f32, dq_ptr=data, dk_ptr=data, dcum_ptr=f32))
    shared["grad_v"] = compile_tile_kernel(
        "grad_v", dict(q_ptr=data, k_ptr=data, dy_ptr=data, cum_ptr=f32, dstates_ptr=f32, dv_ptr=data))
if "per-channel" in decays:  # their tiles are a sub-chunk's, whatever the chunk
    qk = dict(q_ptr=data, k_ptr=data, cum_ptr=f32)
    shared["channel_output"] = compile_tile_kernel(
        "channel_output", dict(qk, v_ptr=data, states_ptr=f32, y_ptr=data), SUB=K.SUB_CHUNK)
    shared["channel_grad_qk"] = compile_tile_kernel(
        "channel_grad_qk", dict(qk, v_ptr=data, dy_ptr=data, states_ptr=f32, dstates_ptr=f32, dq_ptr=f32,
                                dk_ptr=f32, dcum_ptr=f32), SUB=K.SUB_CHUNK)
    shared["channel_grad_v"] = compile_tile_kernel(
        "channel_grad_v", dict(qk, dy_ptr=data, dstates_ptr=f32, dv_ptr=data), SUB=K.SUB_CHUNK)
print(json.dumps(shared))
"""


def compile_for_gpu(dtype, P, N, chunk, arch, decays=("scalar", "per-channel")):
    """{kernel name: shared memory in bytes} of the kernels compiled for cuda sm_<arch>: those of the scalar decay,
    of the per-channel decay, or both."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, dtype, str(P), str(N), str(chunk), str(arch),
                             ",".join(decays)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        if "No module named 'triton.backends.nvidia'" in result.stderr:
            pytest.skip("this triton build has no NVIDIA backend")
        pytest.fail(f"compiling for sm_{arch} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


KERNELS = {"scalar": {"chunk_state", "chunk_output", "grad_qk", "grad_v", "state_pass", "state_pass_backward"},
           "per-channel": {"chunk_state_per_channel", "channel_output", "channel_grad_qk", "channel_grad_v",
                           "state_pass_per_channel", "state_pass_backward_per_channel"}}


# The per-channel kernels' tiles are a sub-chunk's whatever the chunk, so they are compiled at a few sizes only (they
# take 5 to 10 seconds each time): the widest heads, the smallest, and the smallest chunk at the widest float32
# heads, where the scalar part of the bound is smallest and theirs nearly reaches it.
@pytest.mark.skipif(not HAS_TRITON or not sys.platform.startswith("linux"), reason="needs triton's Linux wheel")
@pytest.mark.parametrize("dtype, P, N, chunk, arch, decays", [
    ("bf16", 128, 128, 64, 90, ("scalar", "per-channel")),   # the widest heads at the default chunk
    ("fp32", 128, 128, 64, 90, ("scalar",)),                  # float32 doubles every tile
    ("bf16", 128, 128, 128, 90, ("scalar",)),                 # the largest chunk
    ("bf16", 64, 128, 64, 80, ("scalar",)),                   # the paper preset's heads (headdim 64, d_state 128)
    ("bf16", 64, 128, 16, 90, ("scalar",)),                   # small chunks: the output kernel stages its state in
                                                              # float32
    ("fp32", 16, 16, 16, 80, ("scalar", "per-channel")),      # the smallest tiles
    ("fp32", 128, 128, 16, 80, ("per-channel",)),             # the widest float32 heads at the smallest chunk
])
def test_kernels_compile_within_the_shared_memory_bound(dtype, P, N, chunk, arch, decays):
    from scan_kernels import triton_shared_memory

    shared = compile_for_gpu(dtype, P, N, chunk, arch, decays)
    bound = triton_shared_memory(P, N, chunk, element_size=2 if dtype == "bf16" else 4)
    assert set(shared) == set().union(*(KERNELS[decay] for decay in decays))
    assert max(shared.values()) <= bound, (shared, bound)
    # the bound should not be so loose that auto refuses sizes that fit: within 2x of the largest kernel
    assert bound <= 2 * max(shared.values()), (shared, bound)
