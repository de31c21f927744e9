"""python -m bench: speed and memory of the chunked scan in scan_kernels.py, printed as tables.

    python -m bench                  CPU: the torch backend, scalar and per-channel decays, against
                                     flash-linear-attention's naive_chunk_simple_gla and naive_recurrent_gla, the
                                     dense SSD formulation and the step-by-step loop, float32, (B=4, L=4096, H=8,
                                     P=64, N=64); Mamba-1's scan (H=1536 heads of P=1, N=16, L=2048) against a
                                     step-by-step loop; then memory against L; then whole Mamba-1 and Mamba-2
                                     models of the 130m size reading 2048 tokens against transformers' models
    python -m bench --device cuda    GPU: triton vs torch vs flash-linear-attention's chunk_simple_gla (scalar) and
                                     chunk_gla (per channel) vs causal scaled_dot_product_attention, bfloat16, B=8,
                                     H=32, P=64, N=128, L up to 32768; Mamba-1's scan vs mamba_ssm's selective scan
    python -m bench --delta          CPU: the delta rule (delta_rule/, DeltaNet and Gated DeltaNet) against
                                     flash-linear-attention's naive chunked and recurrent delta rules, float32,
                                     (B=4, L=4096, H=8 heads with q and k of their own, P=64, N=64)
    python -m bench --eval           eval.py's default job (8 sequences, loss against position and its control) on
                                     a model of the demo size, at --len 16384 and 131072: time and peak memory
    python -m bench --eval --model mamba2-130m
                                     the same on an official size with random weights, reading random tokens of
                                     its vocabulary (1 sequence of 8192 and 16384), and what the README's
                                     evaluation of mamba2-370m should take here, scaled by parameters
    python -m bench --estimate       ESTIMATED GPU memory and hours of train.py's official-size presets: memory
                                     from runs.training_memory, time from a FLOP count at an assumed utilisation;
                                     and the minutes of BABILong's reading in RESULTS.md's GPU recipe

Speed is the best of several repetitions after a warm-up, reported as tokens per second (B * L / seconds). On the
CPU each measurement runs in its own process and peak memory is that process's peak resident size above what it
held once its inputs existed; on CUDA it is torch.cuda.max_memory_allocated above the inputs. The delta rule's table
reports the median of rounds that take turns between the implementations (a machine shared with other jobs then
slows them alike).
"""
if __name__ == "__main__":  # a Ctrl-C while the imports below load ends quietly, not with a traceback
    import signal
    import sys
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

import runs
from scan_kernels import chunked_scan, dense_scan, scan_reference
from model import LM, MIXERS, ModelConfig, option

REPO = Path(__file__).resolve().parent.parent  # the measurements in fresh processes run python -m bench from here


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------

CPU_SHAPE = dict(B=4, L=4096, G=1, H=8, N=64, P=64)  # the CPU table's heads: Mamba-2-like, scaled down
GPU_SHAPE = dict(B=8, G=1, H=32, N=128, P=64)  # the paper preset's heads (headdim 64, d_state 128)
MAMBA1_SHAPE = dict(B=1, L=2048, G=1, H=1536, N=16, P=1)  # Mamba-1 130m's scan: d_inner = 1536 heads of P = 1


def make_inputs(B, L, G, H, N, P, dtype, device, requires_grad, decay="scalar"):
    """Random scan inputs.  q, k (B, L, G, N); v (B, L, H, P); log_decay by decay:
        "scalar"         (B, L, H), -U(0, 0.1) per step
        "per channel"    (B, L, H, N), -U(0, 0.1) per step: GLA's gate at its usual temperature (logsigmoid / 16)
        "strong"         (B, L, H, N), -U(0, 2) per step: the torch path then cuts its chunks into sub-chunks of 8
        "mamba1"         (B, L, H, N), dt A with dt log-uniform in [0.001, 0.1] per step and head and A = -(1..N),
                         Mamba-1's initialisation
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, L, G, N, generator=gen) / N ** 0.5
    k = torch.randn(B, L, G, N, generator=gen) / N ** 0.5
    v = torch.randn(B, L, H, P, generator=gen)
    if decay == "mamba1":
        dt = torch.exp(torch.empty(B, L, H, 1).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
        log_decay = -dt * torch.arange(1, N + 1)
    else:
        strength = 2.0 if decay == "strong" else 0.1
        log_decay = -torch.rand(*(B, L, H) if decay == "scalar" else (B, L, H, N), generator=gen) * strength
    tensors = [q.to(dtype), k.to(dtype), v.to(dtype), log_decay]
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


@functools.lru_cache(maxsize=None)  # once per process: what cannot be imported is said once
def implementations(device):
    """name -> function with chunked_scan's positional contract (q, k, v, log_decay) -> (y, final state).  A
    function's optional .prepare turns those inputs into its own, outside the timing."""
    if device == "cuda":
        impls = {"triton (ours)": lambda *x: chunked_scan(*x, backend="triton"),
                 "torch (ours)": lambda *x: chunked_scan(*x, backend="torch")}
    else:
        impls = {"torch (ours)": lambda *x: chunked_scan(*x, backend="torch"), "dense SSD": dense_scan,
                 "loop (scan_reference)": scan_reference}
    impls.update(_external_baselines(device))
    return impls


def _per_head(q, k, v, g):
    """Inputs for flash-linear-attention: q and k expanded to one per head, (B, L, H, N)."""
    expand = [x.expand(-1, -1, v.shape[2], -1).contiguous().detach().requires_grad_(x.requires_grad) for x in (q, k)]
    return expand + [v, g]


def _external_baselines(device):
    """flash-linear-attention's functions for the same recurrence (its naive PyTorch ones on the CPU, its Triton
    kernels on CUDA), mamba_ssm's selective scan and causal attention on CUDA: those that import here."""
    import warnings

    impls = {}
    try:
        with warnings.catch_warnings():  # on a CPU, fla warns that it falls back from Triton
            warnings.simplefilter("ignore")
            if device == "cuda":
                from fla.ops.gla import chunk_gla as gla
                from fla.ops.simple_gla import chunk_simple_gla as simple_gla
                names = ("fla chunk_simple_gla", "fla chunk_gla")
            else:
                from fla.ops.gla.naive import naive_recurrent_gla as gla
                from fla.ops.simple_gla.naive import naive_chunk_simple_gla as simple_gla
                names = ("fla naive_chunk_simple_gla", "fla naive_recurrent_gla")

        def simple_gla_scan(q, k, v, g):  # g (B, L, H): a scalar decay per head
            return simple_gla(q, k, v, g, scale=1.0, output_final_state=True)

        def gla_scan(q, k, v, g):  # g (B, L, H, N): a decay per key channel
            return gla(q, k, v, g, output_final_state=True)  # the naive one has no scale argument (it uses N^-0.5)

        simple_gla_scan.prepare = gla_scan.prepare = _per_head
        impls.update({names[0]: simple_gla_scan, names[1]: gla_scan})
    except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
        print(f"(flash-linear-attention not available: {type(error).__name__}: {error}; "
              f"pip install flash-linear-attention)", file=sys.stderr)
    if device == "cuda":
        impls.update(_mamba_ssm_baseline())

        def causal_attention(q, k, v, log_decay):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out, out.new_zeros(())

        # a Transformer head of the same width: q, k, v all (B, H, L, P)
        causal_attention.prepare = lambda q, k, v, g: [
            torch.randn(v.shape[0], v.shape[2], v.shape[1], v.shape[3], dtype=v.dtype, device=v.device,
                        requires_grad=v.requires_grad) for _ in range(3)] + [g]
        impls["causal attention (sdpa)"] = causal_attention
    return impls


def _mamba_ssm_baseline():
    """mamba_ssm's selective scan (Mamba-1's CUDA kernel), for heads of P = 1: with d = H channels,
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[n] u_t[d], y_t[d] = C_t . h_t[d]."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # noqa: BLE001
        print(f"(mamba_ssm not available: {type(error).__name__}: {error})", file=sys.stderr)
        return {}

    def selective_scan(u, delta, A, B, C):
        return selective_scan_fn(u, delta, A, B, C, return_last_state=True)

    def prepare(q, k, v, log_decay):  # the same sizes, in its layout: u, delta (B, H, L); A (H, N); B, C (B, N, L)
        u = v[..., 0].transpose(1, 2).contiguous().detach().requires_grad_(v.requires_grad)
        delta = torch.rand_like(u).mul(0.1).detach().requires_grad_(v.requires_grad)
        A = -torch.arange(1, q.shape[3] + 1, device=q.device).float().repeat(v.shape[2], 1).requires_grad_(
            v.requires_grad)
        B_, C_ = (x[:, :, 0].transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad) for x in (k, q))
        return [u, delta, A, B_, C_]

    selective_scan.prepare = prepare
    return {"mamba_ssm selective_scan": selective_scan}


def _resident_mb():
    """This process's current resident memory in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return 0.0


def _peak_resident_mb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KB on Linux


def _reset_peak_resident():
    """Restart this process's peak resident size from its current size (Linux: 5 written to /proc/self/clear_refs),
    so that the peak read after a measurement is the measurement's, not that of making its inputs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(impl, mode, B, L, G, H, N, P, dtype, device, repeats, decay="scalar"):
    """Time one implementation in one mode ('fwd' or 'fwd+bwd').  Returns {seconds, tokens_per_s, peak_mb}.
    repeats=0 times the first run itself (for baselines too slow to run twice)."""
    fn = delta_implementations()[impl] if impl in dict(DELTA_ROWS) else implementations(device)[impl]
    inputs = make_inputs(B, L, G, H, N, P, getattr(torch, dtype), device, requires_grad=(mode == "fwd+bwd"),
                         decay=decay)
    if hasattr(fn, "prepare"):
        inputs = fn.prepare(*inputs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once():
        if mode == "fwd":
            with torch.no_grad():
                fn(*inputs)
        else:
            y, final = fn(*inputs)
            (y.float().sum() + final.float().sum()).backward()
            for t in inputs:
                t.grad = None

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2 ** 20
    else:
        _reset_peak_resident()
        base_mb = _resident_mb()
    best = float("inf")
    for i in range(repeats + 1):  # the first run is a warm-up (compilation, autotuning, allocator) unless repeats=0
        start = time.perf_counter()
        once()
        sync()
        if i > 0 or repeats == 0:
            best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else _peak_resident_mb()
    return {"seconds": best, "tokens_per_s": B * L / best, "peak_mb": max(0.0, peak - base_mb)}


def measure_isolated(**spec):
    """On the CPU, measure in a fresh process so that its peak memory belongs to this measurement alone."""
    if spec["device"] == "cuda":
        return measure(**spec)
    return _in_fresh_process("--_measure", spec)


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------

def print_table(title, header, rows):
    runs.print_table([header] + rows, left=1, title=title, rule=True)


# The CPU table's rows (implementation, decay), and the runs too slow to repeat: those are timed once, without a
# warm-up. fla's naive_recurrent_gla backward copies its whole output at every step (about 90 s at this shape).
CPU_ROWS = [("torch (ours)", "scalar"), ("torch (ours)", "per channel"), ("torch (ours)", "strong"),
            ("fla naive_chunk_simple_gla", "scalar"), ("fla naive_recurrent_gla", "per channel"),
            ("dense SSD", "scalar"), ("loop (scan_reference)", "scalar")]
TIMED_ONCE = {("fla naive_recurrent_gla", "fwd+bwd"), ("loop (scan_reference)", "fwd"),
              ("loop (scan_reference)", "fwd+bwd")}
DECAY_NAMES = {"scalar": "scalar", "per channel": "per channel", "strong": "per channel, -U(0, 2)"}


def cpu_tables(repeats):
    shape = dict(CPU_SHAPE, dtype="float32", device="cpu")
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; shape {shape}")
    available = implementations("cpu")
    results, rows = {}, []
    for impl, decay in CPU_ROWS:
        if impl not in available:
            continue
        for mode in ("fwd", "fwd+bwd"):
            results[impl, decay, mode] = measure_isolated(
                impl=impl, mode=mode, repeats=0 if (impl, mode) in TIMED_ONCE else repeats, decay=decay, **shape)
        fwd, both = results[impl, decay, "fwd"], results[impl, decay, "fwd+bwd"]
        same_decay = "per channel" if decay == "per channel" else "scalar"
        ours = [results["torch (ours)", same_decay, m] for m in ("fwd", "fwd+bwd")]
        speedup = "" if impl == "torch (ours)" else \
            f"{fwd['seconds'] / ours[0]['seconds']:.1f}x / {both['seconds'] / ours[1]['seconds']:.1f}x"
        rows.append([impl, DECAY_NAMES[decay], f"{fwd['seconds'] * 1e3:,.0f}", f"{both['seconds'] * 1e3:,.0f}",
                     f"{both['peak_mb']:.0f}", speedup])
    print_table("chunked scan on CPU (ms, the best of the repetitions; peak MB of fwd+bwd above the inputs)",
                ["implementation", "decay", "fwd ms", "fwd+bwd ms", "peak MB", "ours faster by (fwd / fwd+bwd)"],
                rows)
    for mode in ("fwd", "fwd+bwd"):
        ours = [results["torch (ours)", decay, mode]["seconds"] for decay in ("scalar", "per channel", "strong")]
        print(f"{mode}: a decay per key channel costs the torch backend {ours[1] / ours[0]:.2f}x the scalar decay's "
              f"time ({ours[2] / ours[0]:.2f}x with decays of up to -2 per step)")
    mamba1_table(repeats, available)

    rows = []
    for L in [1024, 4096, 16384]:
        row = [L]
        for decay in ("scalar", "per channel"):
            r = measure_isolated(impl="torch (ours)", mode="fwd+bwd", repeats=repeats, decay=decay,
                                 **{**shape, "L": L})
            row += [f"{r['tokens_per_s']:,.0f}", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / L * 1024:.1f}"]
        rows.append(row)
    print_table("torch backend, fwd+bwd, against L (memory per token should stay flat)",
                ["L", "scalar tokens/s", "peak MB", "MB per 1k tokens", "per channel tokens/s", "peak MB",
                 "MB per 1k tokens"], rows)


def mamba1_table(repeats, available):
    """Mamba-1's scan at the 130m size, against a step-by-step loop: fla's naive_recurrent_gla, the loop that
    transformers' MambaForCausalLM also runs without its CUDA kernels. The loop's backward is not run: it copies the
    whole output at every step (minutes)."""
    shape = dict(MAMBA1_SHAPE, dtype="float32", device="cpu")
    rows, fwd_seconds = [], {}
    for impl in ("torch (ours)", "fla naive_recurrent_gla"):
        if impl not in available:
            continue
        row = [impl]
        for mode in ("fwd", "fwd+bwd"):
            if impl != "torch (ours)" and mode == "fwd+bwd":
                row += ["not run", "-"]
                continue
            r = measure_isolated(impl=impl, mode=mode, repeats=repeats, decay="mamba1", **shape)
            fwd_seconds[impl] = fwd_seconds.get(impl, r["seconds"])
            row += [f"{r['seconds'] * 1e3:,.0f}", f"{r['peak_mb']:.0f}"]
        rows.append(row)
    print_table("Mamba-1's scan on CPU: B=1, L=2048, H=1536 heads of P=1, N=16, log_decay = dt A at Mamba-1's "
                "initialisation", ["implementation", "fwd ms", "fwd peak MB", "fwd+bwd ms", "fwd+bwd peak MB"], rows)
    if len(fwd_seconds) == 2:
        ratio = fwd_seconds["fla naive_recurrent_gla"] / fwd_seconds["torch (ours)"]
        print(f"fwd: the torch backend is {ratio:.1f}x faster than fla naive_recurrent_gla (a step-by-step loop)")


def gpu_correctness():
    """Compiled Triton kernels against the torch path on awkward sizes (odd L, grouped heads, an initial state):
    outputs and all five gradients, as relative errors. Printed before any timing, so a fast wrong kernel shows."""
    rows = []
    for decay in ("scalar", "per channel"):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, log_decay = make_inputs(2, 1000, 2, 8, 128, 64, dtype, "cuda", requires_grad=True, decay=decay)
            initial = torch.randn(2, 8, 64, 128, device="cuda", requires_grad=True)
            gy = torch.randn(2, 1000, 8, 64, device="cuda")
            gs = torch.randn(2, 8, 64, 128, device="cuda")
            results = {}
            for backend in ("triton", "torch"):
                y, final = chunked_scan(q, k, v, log_decay, initial, backend=backend)
                loss = (y.float() * gy).sum() + (final * gs).sum()
                results[backend] = [y, final, *torch.autograd.grad(loss, (q, k, v, log_decay, initial))]
            errors = [((a.double() - b.double()).norm() / b.double().norm()).item()
                      for a, b in zip(results["triton"], results["torch"])]
            rows.append([decay, str(dtype).replace("torch.", "")] + [f"{e:.1e}" for e in errors])
    print_table("triton vs torch on CUDA (relative error; expect ~1e-6 for float32, ~1e-2 for bfloat16)",
                ["decay", "dtype", "y", "final", "dq", "dk", "dv", "dlog_decay", "dinitial"], rows)


# The GPU tables: (title, decay, shapes, implementations that take that decay)
GPU_TABLES = [
    ("scalar decay, bfloat16, B=8, H=32, P=64, N=128, G=1", "scalar",
     [dict(GPU_SHAPE, L=L) for L in (2048, 8192, 32768)],
     ("triton (ours)", "torch (ours)", "fla chunk_simple_gla", "causal attention (sdpa)")),
    ("decay per key channel, bfloat16, B=8, H=32, P=64, N=128, G=1", "per channel",
     [dict(GPU_SHAPE, L=L) for L in (2048, 8192, 32768)], ("triton (ours)", "torch (ours)", "fla chunk_gla")),
    ("Mamba-1's scan, bfloat16, B=1, H=1536 heads of P=1, N=16", "mamba1",
     [dict(MAMBA1_SHAPE, L=L) for L in (2048, 8192)], ("triton (ours)", "torch (ours)", "mamba_ssm selective_scan")),
]


def gpu_tables(repeats):
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    gpu_correctness()
    available = implementations("cuda")
    for title, decay, shapes, wanted in GPU_TABLES:
        names = [name for name in wanted if name in available]
        for mode in ["fwd", "fwd+bwd"]:
            rows = []
            for shape in shapes:
                row = [shape["L"]]
                for impl in names:
                    try:
                        r = measure(impl=impl, mode=mode, dtype="bfloat16", device="cuda", repeats=repeats,
                                    decay=decay, **shape)
                        row.append(f"{r['seconds'] * 1e3:.2f} ms / {r['peak_mb']:.0f} MB")
                    except Exception as error:  # noqa: BLE001 - an out-of-memory baseline is a result, not a crash
                        row.append(type(error).__name__)
                    torch.cuda.empty_cache()
                rows.append(row)
            print_table(f"{mode}, {title} (time / peak memory above inputs)", ["L"] + names, rows)


# ----------------------------------------------------------------------------------------------------------------
# The delta rule (delta_rule/) against flash-linear-attention's naive PyTorch forms
# ----------------------------------------------------------------------------------------------------------------

# (implementation, gated): DeltaNet's rows, then Gated DeltaNet's; ours first in each
DELTA_ROWS = [("delta rule (ours)", False), ("fla delta_rule_chunkwise", False), ("fla delta_rule_recurrence", False),
              ("gated delta rule (ours)", True), ("fla naive_chunk_gated_delta_rule", True),
              ("fla naive_recurrent_gated_delta_rule", True)]
DELTA_ROUNDS = 3


def _delta_inputs(q, k, v, log_decay, gated, head_first):
    """make_inputs' tensors made the delta rule's: k L2-normalised as DeltaNet does, beta U(0, 1) (B, L, H), the gate
    kept only when gated; transposed to (B, H, L, D) for fla's DeltaNet functions (head_first)."""
    beta = torch.rand(v.shape[:3], generator=torch.Generator().manual_seed(1)).to(v.device)
    tensors = [q, F.normalize(k, dim=-1), v, beta] + ([log_decay] if gated else [])
    if head_first:
        tensors = [t.transpose(1, 2) for t in tensors]
    return [t.contiguous().detach().requires_grad_(v.requires_grad) for t in tensors]


@functools.lru_cache(maxsize=None)
def delta_implementations():
    """name -> function of (q, k, v, beta[, log_decay]) returning (y, final state), with .prepare from make_inputs'
    tensors: delta_rule's chunked path, and fla's naive functions where fla imports (they scale q by N^-0.5, which
    costs nothing here; fla's chunkwise DeltaNet keeps its own chunk of 32)."""
    from delta_rule import chunked_delta_rule

    functions = {"delta rule (ours)": (chunked_delta_rule, False),  # (function, takes (B, H, L, D) tensors)
                 "gated delta rule (ours)": (chunked_delta_rule, False)}
    try:
        import warnings
        with warnings.catch_warnings():  # on a CPU, fla warns that it falls back from Triton
            warnings.simplefilter("ignore")
            from fla.ops.delta_rule.naive import delta_rule_chunkwise, delta_rule_recurrence
            from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
        functions.update({
            "fla delta_rule_chunkwise": (delta_rule_chunkwise, True),
            "fla delta_rule_recurrence": (delta_rule_recurrence, True),
            "fla naive_chunk_gated_delta_rule": (  # its gate comes before beta
                lambda q, k, v, beta, g: naive_chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True),
                False),
            "fla naive_recurrent_gated_delta_rule": (
                lambda q, k, v, beta, g: naive_recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True),
                False)})
    except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
        print(f"(flash-linear-attention not available: {type(error).__name__}: {error}; "
              f"pip install flash-linear-attention)", file=sys.stderr)
    impls = {}
    for name, gated in DELTA_ROWS:
        if name in functions:
            fn, head_first = functions[name]
            impls[name] = functools.partial(fn)  # a wrapper of its own, to carry .prepare
            impls[name].prepare = functools.partial(_delta_inputs, gated=gated, head_first=head_first)
    return impls


def delta_table(repeats):
    """Ours against fla's naive chunked and recurrent forms, DeltaNet and Gated DeltaNet. Each measurement runs in a
    fresh process (a process's earlier work changes how fast its memory allocator serves large tensors, by up to 2x
    here), and DELTA_ROUNDS rounds take turns between the implementations, so that a change in a shared machine's
    load falls on all of them alike: the median of the rounds' bests. fla's fwd+bwd take minutes (its row loops
    and per-step copies) and are timed once; its recurrent forms at B=1 with the time multiplied by B (the rows are
    independent work; at B=4 their autograd keeps several copies of the state per step, 8 GB for DeltaNet's and
    over 12 GB for the gated one)."""
    shape = dict(CPU_SHAPE, G=CPU_SHAPE["H"], dtype="float32", device="cpu")
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; shape {shape}; the median of "
          f"{DELTA_ROUNDS} rounds, each the best of {repeats}")
    available = [(impl, gated) for impl, gated in DELTA_ROWS if impl in delta_implementations()]
    fast = [(impl, mode) for impl, _ in available for mode in ("fwd", "fwd+bwd") if "fla" not in impl or mode == "fwd"]
    times = {key: [] for key in fast}
    for _ in range(DELTA_ROUNDS):
        for impl, mode in fast:
            times[impl, mode].append(measure_isolated(impl=impl, mode=mode, repeats=repeats, **shape)["seconds"])
    seconds = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
    for impl, _ in available:
        if "fla" in impl:
            batch = 1 if "recurren" in impl else shape["B"]
            r = measure_isolated(impl=impl, mode="fwd+bwd", repeats=0, **{**shape, "B": batch})
            seconds[impl, "fwd+bwd"] = r["seconds"] * shape["B"] / batch
    rows = []
    for impl, gated in available:
        ours_name = "gated delta rule (ours)" if gated else "delta rule (ours)"
        ours, theirs = ([seconds[name, mode] for mode in ("fwd", "fwd+bwd")] for name in (ours_name, impl))
        note = " (timed once" + (f", B=1 x {shape['B']})" if "recurren" in impl else ")") if "fla" in impl else ""
        rows.append([impl, "gated" if gated else "none", f"{theirs[0] * 1e3:,.0f}", f"{theirs[1] * 1e3:,.0f}{note}",
                     "" if "ours" in impl else f"{theirs[0] / ours[0]:.1f}x / {theirs[1] / ours[1]:.1f}x"])
    print_table(f"the delta rule on CPU (ms: the median of {DELTA_ROUNDS} rounds; fla's fwd+bwd timed once)",
                ["implementation", "gate", "fwd ms", "fwd+bwd ms", "ours faster by (fwd / fwd+bwd)"], rows)


# ----------------------------------------------------------------------------------------------------------------
# Whole models on the CPU: this project's against transformers' (what a user would pick instead)
# ----------------------------------------------------------------------------------------------------------------

def transformers_model(size):
    """transformers' MambaForCausalLM or Mamba2ForCausalLM of an official size, random weights, in eval mode (its
    PyTorch path: without mamba_ssm's CUDA kernels that is what runs on a CPU). The output layer is tied to the
    embedding, as in the official models and ours: Mamba2Config's default gives it one of its own (38.6M more
    parameters at the 130m size)."""
    import transformers
    from pretrained import official_config

    transformers.logging.set_verbosity_error()  # it says, once per layer, that it falls back to PyTorch
    cfg = official_config(size)
    if cfg.mixer == "mamba1":
        config = transformers.MambaConfig(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model,
                                          num_hidden_layers=cfg.n_layer, state_size=cfg.d_state, expand=cfg.expand,
                                          tie_word_embeddings=True)
        return transformers.MambaForCausalLM(config).eval()
    config = transformers.Mamba2Config(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model,
                                       num_hidden_layers=cfg.n_layer, state_size=cfg.d_state, head_dim=cfg.headdim,
                                       num_heads=cfg.expand * cfg.d_model // cfg.headdim, n_groups=cfg.ngroups,
                                       expand=cfg.expand, tie_word_embeddings=True)
    return transformers.Mamba2ForCausalLM(config).eval()


def model_measure(impl, size, length, repeats):
    """Read one sequence of `length` random tokens with a model of an official size (random weights): seconds of
    the best repetition after a warm-up, and the peak resident memory above the built model."""
    from model import LM
    from pretrained import official_config

    torch.manual_seed(0)
    model = LM(official_config(size, backend="torch")).eval() if impl == "ours" else transformers_model(size)
    tokens = torch.randint(0, 50277, (1, length))
    base_mb = _resident_mb()
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first is the warm-up
            start = time.perf_counter()
            model(tokens)
            best = min(best, time.perf_counter() - start)
    return {"seconds": best, "tokens_per_s": length / best, "peak_mb": max(0.0, _peak_resident_mb() - base_mb)}


def model_table(repeats):
    """Mamba-1 and Mamba-2 at the 130m size reading 2048 tokens: this project's LM against transformers' models,
    each in a fresh process, side by side with the ratio."""
    rows = []
    for size in ("mamba-130m", "mamba2-130m"):
        results = {}
        for impl in ("ours", "transformers"):
            try:
                results[impl] = _in_fresh_process("--_model_measure", dict(impl=impl, size=size, length=2048,
                                                                          repeats=repeats))
            except runs.UsageError as error:
                advice = "; pip install transformers" if impl == "transformers" else ""
                print(f"({impl} {size}: {error}{advice})", file=sys.stderr)
        if len(results) < 2:
            continue
        ours, theirs = results["ours"], results["transformers"]
        rows.append([size, f"{ours['seconds']:.2f}", f"{theirs['seconds']:.2f}",
                     f"{theirs['seconds'] / ours['seconds']:.1f}x", f"{ours['peak_mb']:.0f}",
                     f"{theirs['peak_mb']:.0f}", f"{theirs['peak_mb'] / max(ours['peak_mb'], 1):.1f}x"])
    print_table(f"whole models on the CPU, one sequence of 2048 tokens, forward, {torch.get_num_threads()} threads "
                f"(random weights; peak memory above the built model)",
                ["model", "ours s", "transformers s", "ours faster by", "ours MB", "transformers MB",
                 "ours smaller by"], rows)


def _in_fresh_process(flag, spec):
    """Run python -m bench FLAG SPEC in a new process (so that its peak memory is its own); its JSON answer, or a
    UsageError (one line) with the child's last line of error."""
    result = subprocess.run([sys.executable, "-m", "bench", flag, json.dumps(spec)], capture_output=True, text=True,
                            cwd=REPO)
    if result.returncode != 0:  # the child's own last line says what went wrong
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise runs.UsageError(f"a measurement in a fresh process failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# eval.py's job, timed
# ----------------------------------------------------------------------------------------------------------------

OFFICIAL_SIZES = ("mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b")


def random_corpus(folder, vocab_size, tokenizer, num_tokens, seed=0):
    """A prepared corpus (data.Corpus's files) of uniformly random tokens: the speed of a model does not depend on
    the text it reads.  Returns the folder."""
    os.makedirs(folder)
    tokens = torch.randint(0, vocab_size, (2, num_tokens), generator=torch.Generator().manual_seed(seed))
    for split, row in zip(("train", "val"), tokens):
        row.numpy().astype("uint16").tofile(os.path.join(folder, f"{split}.bin"))
    meta = {"name": "random", "tokenizer": tokenizer, "dtype": "uint16", "vocab_size": vocab_size, "eot_token": 0,
            "splits": {s: {"documents": 1, "tokens": num_tokens} for s in ("train", "val")}}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return folder


def eval_checkpoint(folder, size, num_tokens):
    """A randomly initialised checkpoint of the given size in folder/model, and the corpus to evaluate it on: the
    demo preset's (train.py) on its own corpus, or an official Mamba-2 size (pretrained/) on random tokens of its
    tokenizer.  Returns (checkpoint folder, corpus name or folder)."""
    import train
    from data import load_corpus
    from model import LM
    from pretrained import NEOX_TOKENIZER, official_config

    if size == "demo":
        args, _ = runs.resolve({}, train.DEFAULTS, train.load_model, train.reads_text)
        corpus = load_corpus(args.data, args.data_dir)
        cfg = ModelConfig(vocab_size=corpus.vocab_size, **{f.name: getattr(args, f.name)
                                                           for f in dataclasses.fields(ModelConfig) if "help" in f.metadata})
        seq_len, data, tokenizer = args.seq_len, args.data, corpus.meta["tokenizer"]
    else:
        cfg, seq_len, tokenizer = official_config(size), 2048, NEOX_TOKENIZER
        data = random_corpus(os.path.join(folder, "corpus"), cfg.vocab_size, tokenizer, num_tokens)
    ckpt = os.path.join(folder, "model")
    runs.save_checkpoint(ckpt, runs.model_payload(LM(cfg), step=0, args={"seq_len": seq_len, "init": "zero"},
                                                  corpus={"name": os.path.basename(data), "tokenizer": tokenizer}))
    return ckpt, data


def eval_measure(ckpt, data, length, num_seqs):
    """Run eval.py's position-wise evaluation (the model pass and its control) once, on the CPU, in this process.
    Returns {seconds, tokens_per_s (tokens of the model pass per second of the whole job), peak_mb}; meant for a
    fresh process, so that the peak belongs to the evaluation alone."""
    import tempfile

    import eval as evaluation

    with tempfile.TemporaryDirectory() as out:
        args = evaluation.parse(["--ckpt", ckpt, "--data", data, "--len", str(length), "--num_seqs", str(num_seqs),
                                 "--device", "cpu", "--out", out])
        base_mb = _resident_mb()
        start = time.perf_counter()
        evaluation.evaluate(args)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": length * num_seqs / seconds, "peak_mb": _peak_resident_mb() - base_mb}


def eval_table(size, lengths, num_seqs):
    """Time eval.py at each length in a fresh process; for an official size, also what the README's evaluation of
    mamba2-370m should take on this machine, scaled from the measured speed by the number of parameters."""
    import tempfile

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, data = eval_checkpoint(tmp, size, num_seqs * (max(lengths) + 1) + 1)
        for length in lengths:
            r = results[length] = _in_fresh_process("--_eval_measure", dict(ckpt=ckpt, data=data, length=length,
                                                                           num_seqs=num_seqs))
            rows.append([length, f"{r['seconds']:.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mb']:.0f}"])
    print_table(f"python eval.py --len L --num_seqs {num_seqs} (with the control pass), {size} size, random weights, "
                f"{torch.get_num_threads()} threads", ["L", "seconds", "tokens/s (model pass)", "peak MB"], rows)
    if len(lengths) > 1:
        first, last = results[lengths[0]]["peak_mb"], results[lengths[-1]]["peak_mb"]
        print(f"peak memory at {lengths[-1]} is {last / first:.2f}x that at {lengths[0]}")
    if size != "demo":
        ratio = parameters("mamba2-370m") / parameters(size)
        # the slope between the two longest runs leaves out the fixed cost of loading the model
        (short, a), (long, b) = [(L * num_seqs, results[L]["seconds"]) for L in lengths[-2:]] if len(lengths) > 1 \
            else [(0, 0.0), (lengths[0] * num_seqs, results[lengths[0]]["seconds"])]
        seconds_per_token = (b - a) / (long - short)
        print(f"\nestimated: {seconds_per_token * 1e3:.1f} ms per token of the model pass (with its control) for "
              f"{size} between L={lengths[-2] if len(lengths) > 1 else 0} and {lengths[-1]}, scaled by the parameter "
              f"ratio {ratio:.2f} (loading and downloading the model not included):")
        for length in (32768, 16384):
            minutes = seconds_per_token * ratio * 8 * length / 60
            print(f"  python eval.py --ckpt state-spaces/mamba2-370m --data pg19-neox --len {length}: "
                  f"about {minutes:.0f} min for 8 sequences")


# ----------------------------------------------------------------------------------------------------------------
# Training on a GPU: estimates, not measurements
# ----------------------------------------------------------------------------------------------------------------

GPU_MEMORY = 80 * 2 ** 30
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12}  # dense bfloat16 tensor-core peaks
UTILISATION = 0.4  # an assumed sustained share of the peak, not a measured one
ESTIMATED_PRESETS = ("mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba-130m", "mamba-370m",
                     "mamba-790m", "mamba-1.4b", "paper", "gla-paper", "gla-1.3b", "deltanet-1.3b",
                     "gated-deltanet-340m")  # (linear-moe-hub/Gated-Deltanet-1.3B's sizes are not known here)


def parameters(size):
    """Parameters of an official size, counted on the meta device (nothing allocated)."""
    from model import LM
    from pretrained import official_config

    with torch.device("meta"):
        return LM(official_config(size)).num_parameters()


def training_flops_per_token(cfg, num_parameters):
    """6 per parameter for the matmuls (forward 2, backward 4; the tied output layer counted once) plus the chunked
    scan: per layer and token the forward costs about 2 H (C N + C P + 2 N P) (within-chunk scores, their product
    with the values, the state's update and its read-out), the backward twice that."""
    P, N = cfg.head_sizes()
    H, C = cfg.n_heads if "n_heads" in MIXERS[cfg.mixer].flags else cfg.expand * cfg.d_model // P, cfg.chunk_size
    return 6 * num_parameters + 3 * cfg.n_layer * 2 * H * (C * N + C * P + 2 * N * P)


def preset_run(name):
    """(ModelConfig, options) of the run `python train.py --preset NAME` starts, on the meta device: the official
    models' architecture comes from pretrained.official_config, flash-linear-attention's from pretrained.fla.PUBLIC,
    without downloading them."""
    import train
    from pretrained import config_from_json, fla, official_config

    preset = runs.PRESETS[name]
    values = {**train.DEFAULTS, **{k: v for k, v in preset.items() if k not in ("post", "init_from")}}
    args = argparse.Namespace(**values)
    if preset.get("init_from") in fla.PUBLIC:  # flash-linear-attention's checkpoints, as far as known here
        cfg, _ = config_from_json(fla.PUBLIC[preset["init_from"]], chunk_size=args.chunk_size)
        return dataclasses.replace(cfg, recompute=args.recompute), args
    if "init_from" in preset:
        computation = {k: getattr(args, k) for k in ModelConfig.COMPUTATION}
        return official_config(preset["init_from"], **computation), args
    return ModelConfig(vocab_size=50277, **{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
                                            if "help" in f.metadata}), args  # GPT-NeoX's vocabulary, or GPT-2's 50257


def estimate_table():
    """For train.py's GPU presets: memory from runs.training_memory (activations measured on the meta device under
    bfloat16, with block recomputation as the presets have it), and time per 500 steps from a FLOP count at an
    assumed utilisation. The table a reader can check a preset against before renting a GPU."""
    rows = []
    for name in ESTIMATED_PRESETS:
        cfg, args = preset_run(name)
        with torch.device("meta"):
            model = LM(cfg).to(torch.bfloat16)
        n = model.num_parameters()
        tokens_per_micro_batch = args.batch_size * args.seq_len
        fixed = runs.training_memory(model, 0, torch.bfloat16, seq_len=args.seq_len)
        need = runs.training_memory(model, tokens_per_micro_batch, torch.bfloat16, seq_len=args.seq_len)
        per_sequence = (need - fixed) / args.batch_size
        fits = need <= 0.9 * GPU_MEMORY
        largest = int((0.9 * GPU_MEMORY - fixed) // per_sequence)
        tokens = tokens_per_micro_batch * args.grad_accum
        flops = 500 * tokens * training_flops_per_token(cfg, n) * (4 / 3 if cfg.recompute else 1)
        hours = [flops / (UTILISATION * peak) / 3600 for peak in GPU_PEAK_FLOPS.values()]
        rows.append([name, cfg.mixer, f"{n / 1e6:.0f}M", f"{tokens:,}", f"{args.batch_size} x {args.grad_accum}",
                     f"{need / 2 ** 30:.1f}", "yes" if fits else "no", max(largest, 0), *[f"{h:.1f}" for h in hours]])
    peaks = ", ".join(f"{gpu} {flops / 1e12:.0f}" for gpu, flops in GPU_PEAK_FLOPS.items())
    print_table(f"ESTIMATES, not measurements: train.py --preset NAME on one {GPU_MEMORY // 2 ** 30} GiB GPU, bfloat16\n"
                f"  memory: runs.training_memory (16 B per parameter + 1.5 x the activations autograd keeps, measured "
                f"on the meta device; the presets recompute each block in the backward pass)\n"
                f"  time per 500 steps: 6 x parameters x tokens + the chunked scan (forward 2 H (C N + C P + 2 N P) per "
                f"token and layer, backward 2x), x 4/3 for the recomputation, at an ASSUMED {UTILISATION:.0%} of the "
                f"bfloat16 peak ({peaks} TFLOP/s)",
                ["preset", "mixer", "params", "tokens/step", "micro-batch x accum", "est. GiB", "fits",
                 "largest micro-batch", *[f"est. h/500 steps {g}" for g in GPU_PEAK_FLOPS]], rows)


def reading_table():
    """BABILong's reading in RESULTS.md's GPU recipe (eval.py --task babilong --len 262144 --num_seqs 100): 100
    samples of qa1 and qa2 at each published length from 0k to 256k (the few-shot prompt's examples add under 1%),
    read in batches of a length's samples; forward passes only, 2 FLOPs per parameter and token (the scan's share is
    below 2% at these sizes) at the same assumed utilisation."""
    from tasks.babilong.babi import TASKS
    from tasks.babilong.dataset import LENGTH_NAMES, length_tokens

    tokens = 100 * len(TASKS) * sum(length_tokens(n) for n in LENGTH_NAMES if length_tokens(n) <= 262144)
    rows = []
    for name in ("mamba2-370m", "mamba2-780m", "mamba2-1.3b"):
        cfg, _ = preset_run(name)
        with torch.device("meta"):
            n = LM(cfg).num_parameters()
        hours = [2 * n * tokens / (UTILISATION * peak) / 3600 for peak in GPU_PEAK_FLOPS.values()]
        rows.append([name, f"{n / 1e6:.0f}M", f"{tokens / 1e6:.1f}M", *[f"{h * 60:.0f}" for h in hours]])
    print_table(f"ESTIMATES, not measurements: eval.py --task babilong --len 262144 --num_seqs 100, one model, "
                f"2 x parameters x tokens at an ASSUMED {UTILISATION:.0%} of the bfloat16 peak",
                ["model", "params", "tokens read", *[f"est. min {g}" for g in GPU_PEAK_FLOPS]], rows)


@dataclasses.dataclass
class BenchConfig:
    device: str = option("cpu", "which table to print: cpu (the scan, then whole models) or cuda",
                         choices=("cpu", "cuda"))
    repeats: int = option(5, "timed repetitions after the warm-up (the best is kept)")
    eval: bool = option(False, "time eval.py's default job instead of the scan")
    model: str = option("demo", "--eval: the model size (random weights; official sizes read random tokens)",
                        choices=("demo", *OFFICIAL_SIZES))
    len: List[int] = option(None, "--eval: sequence lengths (default: 16384 131072 for demo, 8192 16384 for an "
                                  "official size)")
    num_seqs: int = option(None, "--eval: sequences (default: 8 for demo, 1 otherwise)")
    estimate: bool = option(False, "print estimated GPU memory and time of train.py's GPU presets")
    delta: bool = option(False, "time the delta rule (delta_rule/) against flash-linear-attention's naive forms")


RULES = [(("repeats", "len", "num_seqs"), "at least 1", lambda x: x >= 1),
         (("repeats",), "at most 1,000", lambda x: x <= 1000), (("len",), "at most 16,777,216", lambda x: x <= 2 ** 24),
         (("num_seqs",), "at most 4,096", lambda x: x <= 4096)]
# --eval times eval.py's job, with its own flags; the scan tables take --repeats and --device. --estimate computes.
ONLY_FOR = {**{name: ("eval", (True,)) for name in ("len", "num_seqs", "model")},
            **{name: ("eval", (False,)) for name in ("repeats", "device")}}
MEASUREMENTS = [(f"_{kind}", str, argparse.SUPPRESS, None) for kind in ("measure", "eval_measure", "model_measure")]


def main(argv=None):
    given = runs.parse("python -m bench", __doc__, argv, {"benchmark (BenchConfig)": BenchConfig,
                                                          "": MEASUREMENTS})
    hidden = {k: given.pop(k, None) for k in ("_measure", "_eval_measure", "_model_measure")}  # one measurement,
    args = BenchConfig(**given)  # in a fresh process
    runs.check(given, RULES, ONLY_FOR, vars(args))
    for job, reads in (("estimate", ()), ("delta", ("repeats",))):  # jobs of their own, and the flags they read
        others = [name for name in given if name != job and name not in reads]
        if getattr(args, job) and others:
            raise runs.UsageError(f"--{job} is a job of its own that reads "
                                  f"{' '.join('--' + r for r in reads) or 'no other flag'}: drop --{others[0]}")
    official = args.model != "demo"
    if hidden["_measure"]:
        print(json.dumps(measure(**json.loads(hidden["_measure"]))))
    elif hidden["_eval_measure"]:
        print(json.dumps(eval_measure(**json.loads(hidden["_eval_measure"]))))
    elif hidden["_model_measure"]:
        print(json.dumps(model_measure(**json.loads(hidden["_model_measure"]))))
    elif args.estimate:
        estimate_table()
        reading_table()
    elif args.delta:
        delta_table(args.repeats)
    elif args.eval:
        eval_table(args.model, sorted(args.len or ([8192, 16384] if official else [16384, 131072])),
                   args.num_seqs or (1 if official else 8))
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise runs.UsageError("--device cuda needs a CUDA GPU; run without it for the CPU tables")
        gpu_tables(args.repeats)
    else:
        cpu_tables(args.repeats)
        model_table(args.repeats)


if __name__ == "__main__":
    runs.one_line("python -m bench", main)
