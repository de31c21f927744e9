"""bench.py: speed and memory of the chunked scan in kernels.py, printed as tables.

    python bench.py                  CPU: torch backend vs the dense SSD formulation vs the step-by-step loop,
                                     float32, (B=4, L=4096, H=8, P=64, N=64), then memory against L
    python bench.py --device cuda    GPU: triton vs torch vs flash-linear-attention's chunk_simple_gla vs causal
                                     scaled_dot_product_attention, bfloat16, B=8, H=32, P=64, N=128, L up to 32768
    python bench.py --eval           eval.py's default job (8 sequences, loss against position and its control) on
                                     a model of the demo size, at --len 16384 and 131072: time and peak memory
    python bench.py --eval --model mamba2-130m
                                     the same on an official size with random weights, reading random tokens of
                                     its vocabulary (1 sequence of 8192 and 16384), and what the README's
                                     evaluation of mamba2-370m should take here, scaled by parameters
    python bench.py --estimate       ESTIMATED GPU memory and hours of train.py's official-size presets: memory
                                     from train.estimate_memory, time from a FLOP count at an assumed utilisation

Speed is the best of several repetitions after a warm-up, reported as tokens per second (B * L / seconds). On the
CPU each measurement runs in its own process and peak memory is that process's peak resident size above what it
held once its inputs existed; on CUDA it is torch.cuda.max_memory_allocated above the inputs.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kernels import chunked_scan, scan_reference


# ----------------------------------------------------------------------------------------------------------------
# The dense per-chunk formulation (the form of the Mamba-2 paper's minimal SSD listing), written here for comparison:
# every chunk's (C, C) decay matrix and the (nc + 1, nc + 1) chunk-to-chunk decay matrix are materialised at once,
# and the pass over chunks is one matrix product instead of a loop.
# ----------------------------------------------------------------------------------------------------------------

def _segment_sums(x):
    """sum_{j < t <= i} x_t for i >= j, -inf above the diagonal.  (..., T) -> (..., T, T)"""
    cum = x.cumsum(-1)
    diff = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool, device=x.device).tril()
    return diff.masked_fill(~causal, float("-inf"))


def dense_scan(q, k, v, log_decay, initial_state=None, chunk_size=64):
    """Same contract as kernels.chunked_scan; L must be a multiple of chunk_size. q/k are expanded per head."""
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    R, C = H // G, chunk_size
    q = q.repeat_interleave(R, dim=2).unflatten(1, (L // C, C))  # (B, nc, C, H, N)
    k = k.repeat_interleave(R, dim=2).unflatten(1, (L // C, C))
    v = v.unflatten(1, (L // C, C))  # (B, nc, C, H, P)
    log_decay = log_decay.unflatten(1, (L // C, C)).permute(0, 3, 1, 2)  # (B, H, nc, C)
    cum = log_decay.cumsum(-1)
    within = torch.exp(_segment_sums(log_decay))  # (B, H, nc, C, C)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", q, k, within, v)
    decay_to_end = torch.exp(cum[..., -1:] - cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", k, decay_to_end, v)
    start = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state[:, None].float()
    states = torch.cat([start, states], dim=1)  # (B, nc + 1, H, P, N)
    between = torch.exp(_segment_sums(F.pad(cum[..., -1], (1, 0))))  # (B, H, nc + 1, nc + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", between, states)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", q, states[:, :-1], torch.exp(cum))
    return (y_diag + y_off).reshape(B, L, H, P), states[:, -1]


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------

def make_inputs(B, L, G, H, N, P, dtype, device, requires_grad):
    """Random scan inputs.  q, k (B, L, G, N); v (B, L, H, P); log_decay (B, L, H)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, L, G, N, generator=gen) / N ** 0.5
    k = torch.randn(B, L, G, N, generator=gen) / N ** 0.5
    v = torch.randn(B, L, H, P, generator=gen)
    log_decay = -torch.rand(B, L, H, generator=gen) * 0.1
    tensors = [q.to(dtype), k.to(dtype), v.to(dtype), log_decay]
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


def implementations(device):
    """name -> function with chunked_scan's positional contract."""
    impls = {
        "torch": lambda *x: chunked_scan(*x, backend="torch"),
        "dense": dense_scan,
        "loop": scan_reference,
    }
    if device == "cuda":
        impls = {"triton": lambda *x: chunked_scan(*x, backend="triton"), "torch": impls["torch"]}
        impls.update(_external_gpu_baselines())
    return impls


def _external_gpu_baselines():
    """flash-linear-attention's chunk_simple_gla (the same recurrence) when installed, and causal attention."""
    impls = {}
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        def fla_scan(q, k, v, log_decay):  # q, k expanded per head by prepare, outside the timing
            y, final = chunk_simple_gla(q, k, v, log_decay, scale=1.0, output_final_state=True)
            return y, final

        fla_scan.prepare = lambda q, k, v, g: [x.expand(-1, -1, v.shape[2], -1).contiguous().detach()
                                               .requires_grad_(x.requires_grad) for x in (q, k)] + [v, g]
        impls["fla chunk_simple_gla"] = fla_scan
    except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
        print(f"(flash-linear-attention not available: {type(error).__name__}: {error})", file=sys.stderr)

    def causal_attention(q, k, v, log_decay):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out, out.new_zeros(())

    # a Transformer head of the same width: q, k, v all (B, H, L, P)
    causal_attention.prepare = lambda q, k, v, g: [
        torch.randn(v.shape[0], v.shape[2], v.shape[1], v.shape[3], dtype=v.dtype, device=v.device,
                    requires_grad=v.requires_grad) for _ in range(3)] + [g]
    impls["causal attention (sdpa)"] = causal_attention
    return impls


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


def measure(impl, mode, B, L, G, H, N, P, dtype, device, repeats):
    """Time one implementation in one mode ('fwd' or 'fwd+bwd').  Returns {seconds, tokens_per_s, peak_mb}."""
    fn = implementations(device)[impl]
    inputs = make_inputs(B, L, G, H, N, P, getattr(torch, dtype), device, requires_grad=(mode == "fwd+bwd"))
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
        base_mb = _resident_mb()
    once()  # warm-up: compilation, autotuning, allocator
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        sync()
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else _peak_resident_mb()
    return {"seconds": best, "tokens_per_s": B * L / best, "peak_mb": max(0.0, peak - base_mb)}


def measure_isolated(**spec):
    """On the CPU, measure in a fresh process so that its peak memory belongs to this measurement alone."""
    if spec["device"] == "cuda":
        return measure(**spec)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", json.dumps(spec)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------

def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    for i, row in enumerate([header] + rows):
        print("  ".join(str(x).rjust(w) if j else str(x).ljust(w) for j, (x, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def cpu_tables(repeats):
    shape = dict(B=4, L=4096, G=1, H=8, N=64, P=64, dtype="float32", device="cpu")
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; shape {shape}")
    results, rows = {}, []
    for impl in ["torch", "dense", "loop"]:
        for mode in ["fwd", "fwd+bwd"]:
            r = measure_isolated(impl=impl, mode=mode, repeats=1 if impl == "loop" else repeats, **shape)
            results[impl, mode] = r
            rows.append([impl, mode, f"{r['seconds'] * 1e3:.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mb']:.0f}"])
    print_table("chunked scan on CPU", ["implementation", "mode", "ms", "tokens/s", "peak MB"], rows)
    for mode in ["fwd", "fwd+bwd"]:
        torch_s = results["torch", mode]["seconds"]
        print(f"{mode}: torch backend is {results['dense', mode]['seconds'] / torch_s:.1f}x faster than dense, "
              f"{results['loop', mode]['seconds'] / torch_s:.0f}x faster than the loop")

    rows = []
    for L in [1024, 4096, 16384]:
        r = measure_isolated(impl="torch", mode="fwd+bwd", repeats=repeats, **{**shape, "L": L})
        rows.append([L, f"{r['tokens_per_s']:,.0f}", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / L * 1024:.1f}"])
    print_table("torch backend, fwd+bwd, against L (memory per token should stay flat)",
                ["L", "tokens/s", "peak MB", "MB per 1k tokens"], rows)


def gpu_correctness():
    """Compiled Triton kernels against the torch path on awkward sizes (odd L, grouped heads, an initial state):
    outputs and all five gradients, as relative errors. Printed before any timing, so a fast wrong kernel shows."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, log_decay = make_inputs(2, 1000, 2, 8, 128, 64, dtype, "cuda", requires_grad=True)
        initial = torch.randn(2, 8, 64, 128, device="cuda", requires_grad=True)
        gy = torch.randn(2, 1000, 8, 64, device="cuda")
        gs = torch.randn(2, 8, 64, 128, device="cuda")
        results = {}
        for backend in ("triton", "torch"):
            y, final = chunked_scan(q, k, v, log_decay, initial, backend=backend)
            grads = torch.autograd.grad((y.float() * gy).sum() + (final * gs).sum(), (q, k, v, log_decay, initial))
            results[backend] = [y, final, *grads]
        errors = [((a.double() - b.double()).norm() / b.double().norm()).item()
                  for a, b in zip(results["triton"], results["torch"])]
        rows.append([str(dtype).replace("torch.", "")] + [f"{e:.1e}" for e in errors])
    print_table("triton vs torch on CUDA (relative error; expect ~1e-6 for float32, ~1e-2 for bfloat16)",
                ["dtype", "y", "final", "dq", "dk", "dv", "dlog_decay", "dinitial"], rows)


def gpu_tables(repeats):
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    gpu_correctness()
    names = list(implementations("cuda"))
    for mode in ["fwd", "fwd+bwd"]:
        rows = []
        for L in [2048, 8192, 32768]:
            row = [L]
            for impl in names:
                try:
                    r = measure(impl=impl, mode=mode, B=8, L=L, G=1, H=32, N=128, P=64, dtype="bfloat16",
                                device="cuda", repeats=repeats)
                    row.append(f"{r['seconds'] * 1e3:.2f} ms / {r['peak_mb']:.0f} MB")
                except Exception as error:  # noqa: BLE001 - an out-of-memory baseline is a result, not a crash
                    row.append(type(error).__name__)
                torch.cuda.empty_cache()
            rows.append(row)
        print_table(f"{mode}, bfloat16, B=8, H=32, P=64, N=128, G=1 (time / peak memory above inputs)",
                    ["L"] + names, rows)


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
    demo preset's (train.py) on its own corpus, or an official Mamba-2 size (pretrained.py) on random tokens of its
    tokenizer.  Returns (checkpoint folder, corpus name or folder)."""
    import train
    from data import load_corpus
    from model import LM, ModelConfig
    from pretrained import NEOX_TOKENIZER, official_config

    if size == "demo":
        p = train.PRESETS["demo"]
        corpus = load_corpus(p["train"]["data"])
        cfg, seq_len, data, tokenizer = (ModelConfig(vocab_size=corpus.vocab_size, **p["model"]),
                                         p["train"]["seq_len"], p["train"]["data"], corpus.meta["tokenizer"])
    else:
        cfg, seq_len, tokenizer = official_config(size), 2048, NEOX_TOKENIZER
        data = random_corpus(os.path.join(folder, "corpus"), cfg.vocab_size, tokenizer, num_tokens)
    ckpt = os.path.join(folder, "model")
    LM(cfg).save(ckpt, step=0, args={"seq_len": seq_len, "init": "zero"},
                 corpus={"name": os.path.basename(data), "tokenizer": tokenizer})
    return ckpt, data


def eval_measure(ckpt, data, length, num_seqs):
    """Run eval.py's position-wise evaluation (the model pass and its control) once, on the CPU, in this process.
    Returns {seconds, tokens_per_s (tokens of the model pass per second of the whole job), peak_mb}; meant for a
    fresh process, so that the peak belongs to the evaluation alone."""
    import tempfile

    import eval as evaluation

    with tempfile.TemporaryDirectory() as out:
        args = evaluation.build_parser().parse_args(["--ckpt", ckpt, "--data", data, "--len", str(length),
                                                     "--num_seqs", str(num_seqs), "--device", "cpu", "--out", out])
        base_mb = _resident_mb()
        start = time.perf_counter()
        evaluation.run(args)
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
            spec = json.dumps(dict(ckpt=ckpt, data=data, length=length, num_seqs=num_seqs))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_eval_measure", spec],
                                 capture_output=True, text=True, check=True)
            r = results[length] = json.loads(out.stdout.strip().splitlines()[-1])
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
# Training the official sizes: estimates, not measurements
# ----------------------------------------------------------------------------------------------------------------

GPU_MEMORY = 80 * 2 ** 30
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12}  # dense bfloat16 tensor-core peaks
UTILISATION = 0.4  # an assumed sustained share of the peak, not a measured one


def parameters(size):
    """Parameters of an official Mamba-2 size, counted on the meta device (nothing allocated)."""
    from model import LM
    from pretrained import official_config

    with torch.device("meta"):
        return LM(official_config(size)).num_parameters()


def training_flops_per_token(cfg, num_parameters):
    """6 per parameter for the matmuls (forward 2, backward 4; the tied output layer counted once) plus the chunked
    scan: per layer and token the forward costs about 2 H (C N + C P + 2 N P) (within-chunk scores, their product
    with the values, the state's update and its read-out), the backward twice that."""
    P, N = cfg.head_sizes()
    H, C = cfg.expand * cfg.d_model // P, cfg.chunk_size
    return 6 * num_parameters + 3 * cfg.n_layer * 2 * H * (C * N + C * P + 2 * N * P)


def largest_micro_batch(num_parameters, bytes_per_sequence):
    """The largest batch_size that train.check_memory lets through on an empty GPU_MEMORY card: its estimate less
    the float32 weights (already allocated) within 90% of what the weights leave free."""
    room = 0.9 * (GPU_MEMORY - 4 * num_parameters) - 12 * num_parameters
    return max(0, int(room // bytes_per_sequence))


def estimate_table():
    """For train.py's presets of the official sizes: memory from train.estimate_memory (activations measured on
    the CPU under bfloat16 autocast with the torch scan; Triton's kernels keep somewhat different tensors) and time
    per 500 steps from a FLOP count at an assumed utilisation."""
    import gc
    from types import SimpleNamespace

    import train
    from model import LM
    from pretrained import official_config

    rows = []
    for size in OFFICIAL_SIZES:
        t = train.PRESETS[size]["train"]
        model = LM(official_config(size))  # float32 weights, as in training: the 1.3b takes 5.4 GB of RAM
        n = model.num_parameters()
        need = train.estimate_memory(model, SimpleNamespace(**t), "cpu", torch.autocast("cpu", dtype=torch.bfloat16))
        per_sequence = (need - 16 * n) / t["batch_size"]
        tokens = t["batch_size"] * t["grad_accum"] * t["seq_len"]
        flops = 500 * tokens * training_flops_per_token(model.cfg, n)
        hours = [flops / (UTILISATION * peak) / 3600 for peak in GPU_PEAK_FLOPS.values()]
        largest = largest_micro_batch(n, per_sequence)
        rows.append([size, f"{n / 1e6:.0f}M", f"{tokens:,}", f"{t['batch_size']} x {t['grad_accum']}",
                     f"{need / 2 ** 30:.1f}", "yes" if t["batch_size"] <= largest else "no", largest,
                     *[f"{h:.1f}" for h in hours]])
        del model
        gc.collect()
    peaks = ", ".join(f"{gpu} {flops / 1e12:.0f}" for gpu, flops in GPU_PEAK_FLOPS.items())
    print_table(f"ESTIMATES, not measurements: train.py --preset SIZE on one {GPU_MEMORY // 2 ** 30} GiB GPU\n"
                f"  memory: train.estimate_memory (16 B per parameter + 1.5 x the activations measured on the CPU "
                f"under bfloat16 autocast, torch scan); fits: train.check_memory would let it start\n"
                f"  time: 6 x parameters x tokens + the chunked scan (forward 2 H (C N + C P + 2 N P) per token and "
                f"layer, C = 64, backward 2x) at an ASSUMED {UTILISATION:.0%} of the bfloat16 peak ({peaks} TFLOP/s)",
                ["preset", "params", "tokens/step", "micro-batch x accum", "est. GiB", "fits", "largest micro-batch",
                 *[f"est. h/500 steps {g}" for g in GPU_PEAK_FLOPS]], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="which table to print")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after the warm-up (best is kept)")
    parser.add_argument("--eval", action="store_true", help="time eval.py's default job instead of the scan")
    parser.add_argument("--model", default="demo", choices=("demo", *OFFICIAL_SIZES),
                        help="--eval: the model size (random weights; official sizes read random tokens)")
    parser.add_argument("--len", type=int, nargs="+", help="--eval: sequence lengths (default: 16384 131072 for "
                                                           "demo, 8192 16384 for an official size)")
    parser.add_argument("--num_seqs", type=int, help="--eval: sequences (default: 8 for demo, 1 otherwise)")
    parser.add_argument("--estimate", action="store_true", help="print estimated GPU memory and time of training "
                                                                "the official sizes (train.py's presets)")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)  # internal: one isolated CPU measurement
    parser.add_argument("--_eval_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    official = args.model != "demo"
    lengths = args.len or ([8192, 16384] if official else [16384, 131072])
    num_seqs = args.num_seqs or (1 if official else 8)
    if min(lengths) < 1 or num_seqs < 1:
        parser.error("--len and --num_seqs must be positive")
    if args._measure:
        print(json.dumps(measure(**json.loads(args._measure))))
    elif args._eval_measure:
        print(json.dumps(eval_measure(**json.loads(args._eval_measure))))
    elif args.estimate:
        estimate_table()
    elif args.eval:
        eval_table(args.model, sorted(lengths), num_seqs)
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench.py: --device cuda needs a CUDA GPU; run without it for the CPU table")
        gpu_tables(args.repeats)
    else:
        cpu_tables(args.repeats)


if __name__ == "__main__":
    main()
