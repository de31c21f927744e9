"""eval.py: how a recurrent LM behaves far beyond its training length T.

    python eval.py --len 131072                       every checkpoint under out/, loss against token position
    python eval.py --len 131072 --ckpt out/zero --ckpt out/state_passing --effrem --state_stats
    python eval.py --len 16384 --passkey              passkey retrieval (for models trained on natural language)

Loss against position (always). --num_seqs sequences of --len tokens from the validation split, the same ones for
every checkpoint (a fixed, document-aligned choice recorded in the output), read from the zero state --chunk tokens
at a time with the state handed on, so memory does not grow with --len. The per-position loss is averaged over
sequences and smoothed in log-spaced bins, with a standard-error band across sequences. Each model also gets a
control: the same model and text with the state reset to zero every T tokens, so it never sees a position beyond T.
Text gets easier or harder along a sequence; the control moves with the text, the model's own curve also with its
length generalisation: a model that length-generalises stays at or below its control, a failing one rises above it.

Diagnostics of the paper:
    --effrem       Effective Remembrance EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T])), TV = 1/2 sum |p - q|:
                   how much the prediction after T tokens still depends on the first t of them. A model that has
                   learnt to forget stays near 0 until t approaches T; one overly tied to the distant past does not.
    --state_stats  norm and standard deviation of each layer's SSM state against position: states beyond T that
                   training never produced show up as norms that keep growing past the dashed line.
    --passkey      a 5-digit key hidden at relative depth d of filler text, asked for at the end, answered by greedy
                   decoding through LM.step. Only meaningful for models trained on natural language (with the
                   default byte-level code corpus it measures nothing a reader should trust).

Outputs in --out (default eval/): loss_vs_position.png, loss_vs_position.json (per checkpoint: the binned curve,
its control and the summary means) and .csv, plus effrem.png/.json, state_stats.png/.json and passkey.png/.json
when asked. A summary table of mean loss in [T/2, T), [2T, 8T) and [8T, len) is printed.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DATA_DIR, DataError, load_corpus
from train import (OneLineParser, TrainError, autocast_for, check_backend, checkpoint_path, load_checkpoint,
                   model_from_checkpoint, pick_device)

SUMMARY_BANDS = (("[T/2,T)", 0.5, 1), ("[2T,8T)", 2, 8), ("[8T,len)", 8, None))
LOGITS_BUDGET = 2 ** 26  # logits held at once (256 MB in float32): bounds memory whatever the vocabulary


class EvalError(Exception):
    """A problem with the user's options, told in one line that says what to do."""


def build_parser():
    p = OneLineParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    p.add_argument("--ckpt", action="append", help="checkpoint file or run folder; repeat for several "
                                                   "(default: every out/*/ckpt.pt)")
    p.add_argument("--len", type=int, default=131072, help="tokens per evaluation sequence (default 131072)")
    p.add_argument("--num_seqs", type=int, default=8, help="evaluation sequences (default 8)")
    p.add_argument("--chunk", type=int, default=8192, help="tokens read at a time; the state is handed on "
                                                          "(lowered for large vocabularies: logits stay under 256 MB)")
    p.add_argument("--out", default="eval", help="output folder (default eval/)")
    p.add_argument("--data", help="corpus to read (default: the one the first checkpoint was trained on)")
    p.add_argument("--data_dir", default=str(DATA_DIR))
    p.add_argument("--ppl", action="store_true", help="plot perplexity instead of loss")
    p.add_argument("--bins", type=int, default=48, help="log-spaced bins of the curves")
    p.add_argument("--effrem", action="store_true", help="Effective Remembrance")
    p.add_argument("--effrem_T", type=int, help="the T of EffRem_T (default: 4 x each model's training length)")
    p.add_argument("--effrem_points", type=int, default=33, help="values of t on the EffRem grid")
    p.add_argument("--state_stats", action="store_true", help="SSM state norm and std against position")
    p.add_argument("--passkey", action="store_true", help="passkey retrieval heatmap")
    p.add_argument("--passkey_lengths", type=int, nargs="+", help="prompt lengths in tokens (default: powers of "
                                                                  "two from T to --len)")
    p.add_argument("--passkey_depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--passkey_trials", type=int, default=4, help="random keys per (length, depth) cell")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), help="scan implementation (default: auto)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

class Checkpoint:
    """A trained model with what the evaluation needs to know about it."""

    def __init__(self, path, device, backend=None):
        self.path = str(checkpoint_path(path))
        ckpt = load_checkpoint(path)
        self.model = model_from_checkpoint(ckpt, device, backend=backend).eval()
        args = ckpt["args"]
        self.T, self.init, self.step = args["seq_len"], args["init"], ckpt["step"]
        self.corpus = ckpt.get("corpus", {})
        extra = f", p_zero={args['p_zero']}" if args.get("p_zero") else ""
        self.label = f"{self.init}{extra} (T={self.T})"


def find_checkpoints(paths):
    """The --ckpt paths, or every run under out/ that has a checkpoint."""
    if paths:
        return paths
    found = sorted(str(p.parent) for p in Path("out").glob("*/ckpt.pt"))
    if not found:
        raise EvalError("no checkpoints under out/: train one first (python train.py) or give --ckpt PATH")
    return found


def load_all(paths, device, backend):
    checkpoints = [Checkpoint(p, device, backend) for p in paths]
    tokenizers = {(c.corpus.get("tokenizer"), c.model.cfg.vocab_size) for c in checkpoints}
    if len(tokenizers) > 1:
        raise EvalError(f"these checkpoints read different tokens {sorted(map(str, tokenizers))}, so they cannot "
                        f"be compared on the same text: evaluate them separately")
    labels = [c.label for c in checkpoints]
    for c in checkpoints:
        if labels.count(c.label) > 1:
            c.label = f"{c.label} {Path(c.path).parent.name}"
    return checkpoints


# ----------------------------------------------------------------------------------------------------------------
# Loss against position
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def position_losses(model, sequences, chunk, device, autocast, desc=None):
    """Per-position loss (n, L) of sequences (n, L + 1) from the zero state, read chunk tokens at a time."""
    rows = []
    for seq in tqdm(sequences, desc=desc, leave=False, disable=desc is None):
        with autocast:
            rows.append(model.loss_per_position(seq[None].to(device), chunk)[0].cpu())
    return torch.stack(rows)


def tokens_per_read(chunk, logits_per_token):
    """--chunk, lowered when its logits (logits_per_token = rows read together x vocabulary) would exceed
    LOGITS_BUDGET: memory stays bounded whatever the vocabulary."""
    return max(1, min(chunk, LOGITS_BUDGET // logits_per_token))


@torch.no_grad()
def control_losses(model, sequences, T, device, autocast):
    """The control: per-position loss (n, L) with the state reset to zero every T tokens, so every position is
    read with at most T tokens of context, exactly as in training. Each sequence is cut into independent windows,
    read in batches of at most LOGITS_BUDGET logits (one sequence at a time, so memory does not grow with L)."""
    batch = max(1, LOGITS_BUDGET // (T * model.cfg.vocab_size))
    rows = []
    for seq in sequences:
        L = seq.shape[0] - 1
        padded = F.pad(seq, (0, (-L) % T), value=0)  # whole windows; the padding's losses are dropped below
        windows = padded.unfold(0, T + 1, T) if padded.shape[0] > T else padded[None]
        losses = []
        for part in windows.split(batch):
            with autocast:
                logits, _, _ = model(part[:, :-1].to(device))
            losses.append(F.cross_entropy(logits.float().transpose(1, 2), part[:, 1:].to(device),
                                          reduction="none").flatten().cpu())
        rows.append(torch.cat(losses)[:L])
    return torch.stack(rows)


def log_bins(length, bins):
    """Edges of log-spaced position bins covering [0, length): [(start, end), ...]."""
    edges = np.unique(np.round(np.logspace(0, math.log10(length), bins + 1)).astype(int))
    edges = np.concatenate([[0], edges[edges < length], [length]])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def binned(losses, bins):
    """Mean over sequences and positions in each bin, and the standard error across sequences."""
    means, errors = [], []
    for start, end in bins:
        per_seq = losses[:, start:end].mean(1)
        means.append(per_seq.mean().item())
        errors.append((per_seq.std(unbiased=True) / math.sqrt(len(per_seq))).item() if len(per_seq) > 1 else 0.0)
    return means, errors


def summary(losses, T):
    """Mean loss in [T/2, T), [2T, 8T) and [8T, len): None for a band the sequences do not cover whole."""
    L = losses.shape[1]
    result = {}
    for name, lo, hi in SUMMARY_BANDS:
        start, end = int(lo * T), L if hi is None else int(hi * T)
        result[name] = losses[:, start:end].mean().item() if start < end <= L else None
    return result


def evaluate_positions(checkpoints, sequences, args, device, autocast):
    """Per checkpoint: binned curve, control, summaries.  Returns the list of JSON-ready records."""
    bins = log_bins(sequences.shape[1] - 1, args.bins)
    records = []
    for c in checkpoints:
        chunk = tokens_per_read(args.chunk, c.model.cfg.vocab_size)
        losses = position_losses(c.model, sequences, chunk, device, autocast, desc=f"reading ({c.label})")
        control = control_losses(c.model, sequences, c.T, device, autocast)
        mean, stderr = binned(losses, bins)
        control_mean, _ = binned(control, bins)
        records.append({"path": c.path, "label": c.label, "init": c.init, "T": c.T, "step": c.step,
                        "bins": {"start": [b[0] for b in bins], "end": [b[1] for b in bins], "loss": mean,
                                 "stderr": stderr, "control": control_mean},
                        "summary": summary(losses, c.T), "control_summary": summary(control, c.T)})
    return records


def plot_positions(records, path, ppl):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    transform = np.exp if ppl else (lambda x: x)
    for i, r in enumerate(records):
        color = f"C{i}"
        b = r["bins"]
        x = np.sqrt(np.maximum(b["start"], 1) * np.array(b["end"]))  # geometric bin centres
        loss, err = np.array(b["loss"]), np.array(b["stderr"])
        ax.plot(x, transform(loss), color=color, label=r["label"])
        ax.fill_between(x, transform(loss - err), transform(loss + err), color=color, alpha=0.2, linewidth=0)
        ax.plot(x, transform(np.array(b["control"])), color=color, linestyle=":", linewidth=1)
        ax.axvline(r["T"], color=color, linestyle="--", linewidth=0.8)
    ax.plot([], [], color="gray", linestyle=":", label="control: state reset every T")
    ax.plot([], [], color="gray", linestyle="--", label="training length T")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity" if ppl else "loss (nats / token)")
    ax.set_title("next-token loss against position, on the same validation sequences")
    _finish(fig, ax, path)


def _finish(fig, ax, path):
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_csv(records, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "label", "bin_start", "bin_end", "loss", "stderr", "control"])
        for r in records:
            b = r["bins"]
            for row in zip(b["start"], b["end"], b["loss"], b["stderr"], b["control"]):
                writer.writerow([r["path"], r["label"], *row])


def print_summary(records):
    names = [name for name, _, _ in SUMMARY_BANDS]
    width = max(len(r["label"]) for r in records) + 2
    print("\nmean loss (control: state reset every T)".ljust(width) + "".join(n.rjust(20) for n in names))
    for r in records:
        cells = [_cell(r["summary"][n], r["control_summary"][n]) for n in names]
        print(r["label"].ljust(width) + "".join(c.rjust(20) for c in cells))


def _cell(value, control):
    return "-" if value is None else f"{value:.3f} ({control:.3f})"


# ----------------------------------------------------------------------------------------------------------------
# Effective Remembrance
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def next_token_distribution(model, tokens, device, autocast, chunk=8192):
    """p(. | tokens) for tokens (n, L): the softmax after the last token, read from the zero state chunk tokens
    at a time.  (n, V)"""
    state = None
    for start in range(0, tokens.shape[1], chunk):
        with autocast:
            logits, _, state = model(tokens[:, start:start + chunk].to(device), state=state)
        last = logits[:, -1].float()  # only the last position is needed; the rest is freed with this chunk
        del logits
    return torch.softmax(last, dim=-1)


def effective_remembrance(model, sequences, T, ts, device, autocast, chunk=8192):
    """EffRem_T(t) for each t in ts, averaged over sequences (n, >= T): the total-variation distance between the
    next-token distributions after x[0:T] and after x[t:T] (the first t tokens removed).  Returns a list."""
    full = next_token_distribution(model, sequences[:, :T], device, autocast, chunk)
    values = []
    for t in ts:
        partial = full if t == 0 else next_token_distribution(model, sequences[:, t:T], device, autocast, chunk)
        values.append((0.5 * (full - partial).abs().sum(-1)).mean().item())
    return values


def evaluate_effrem(checkpoints, sequences, args, device, autocast):
    records = []
    for c in tqdm(checkpoints, desc="EffRem", leave=False):
        T = args.effrem_T or 4 * c.T
        ts = sorted(set(np.linspace(0, T - 1, args.effrem_points).round().astype(int).tolist()))
        chunk = tokens_per_read(args.chunk, len(sequences) * c.model.cfg.vocab_size)
        records.append({"path": c.path, "label": c.label, "train_T": c.T, "T": T, "t": ts,
                        "effrem": effective_remembrance(c.model, sequences, T, ts, device, autocast, chunk)})
    return records


def plot_effrem(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(records):
        t, e = np.array(r["t"]), np.maximum(np.array(r["effrem"]), 1e-6)  # EffRem(0) = 0 cannot sit on a log axis
        ax.plot(t[1:], e[1:], color=f"C{i}", marker=".", label=f"{r['label']}, EffRem_{r['T']}")
        ax.axvline(r["T"] - r["train_T"], color=f"C{i}", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("t: tokens removed from the start of the context")
    ax.set_ylabel("EffRem_T(t) = TV(p(.|x[0:T]), p(.|x[t:T]))")
    ax.set_title("Effective Remembrance (dashed: t = T - training length)")
    _finish(fig, ax, path)


# ----------------------------------------------------------------------------------------------------------------
# State statistics
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def state_statistics(model, sequences, positions, chunk, device, autocast):
    """Per layer, the Frobenius norm and the standard deviation of the SSM state after each of the given positions
    (sorted, in tokens read), averaged over sequences (n, >= max position).  Returns {"norm": [[per position] per
    layer], "std": ...}."""
    boundaries = sorted(set(positions) | set(range(chunk, max(positions), chunk)))
    norms = [[] for _ in model.backbone.layers]
    stds = [[] for _ in model.backbone.layers]
    state, start = None, 0
    for end in boundaries:
        with autocast:
            _, _, state = model(sequences[:, start:end].to(device), state=state)
        start = end
        if end in positions:
            for i, s in enumerate(state.ssm):
                flat = s.float().flatten(1)  # (n, H * P * N)
                norms[i].append(flat.norm(dim=1).mean().item())
                stds[i].append(flat.std(dim=1).mean().item())
    return {"norm": norms, "std": stds}


def evaluate_state_stats(checkpoints, sequences, args, device, autocast):
    L = sequences.shape[1] - 1
    positions = sorted(set(np.unique(np.round(np.logspace(0, math.log10(L), 40)).astype(int)).tolist()))
    records = []
    for c in tqdm(checkpoints, desc="state statistics", leave=False):
        chunk = tokens_per_read(args.chunk, len(sequences) * c.model.cfg.vocab_size)  # all rows are read at once
        records.append({"path": c.path, "label": c.label, "T": c.T, "positions": positions,
                        **state_statistics(c.model, sequences, positions, chunk, device, autocast)})
    return records


def plot_state_stats(records, path, columns=4):
    """One panel per checkpoint and statistic (norm above std), at most `columns` checkpoints per row, with a
    shared y-range per statistic so that models can be compared at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(columns, len(records))
    groups = math.ceil(len(records) / ncols)
    fig, axes = plt.subplots(2 * groups, ncols, figsize=(4.2 * ncols, 3.4 * 2 * groups), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, r in enumerate(records):
        for offset, key in enumerate(("norm", "std")):
            ax = axes[2 * (i // ncols) + offset, i % ncols]
            ax.set_visible(True)
            for layer, values in enumerate(r[key]):
                ax.plot(r["positions"], values, label=f"layer {layer}")
            ax.axvline(r["T"], color="gray", linestyle="--", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            values = [v for rec in records for layer in rec[key] for v in layer if v > 0]
            ax.set_ylim(min(values) / 1.2, max(values) * 1.2)
            ax.set_xlabel("token position")
            ax.set_title(f"{r['label']}: state {key}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval
# ----------------------------------------------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length, depth, key):
    """Token ids of about `length` tokens: intro, filler with the key sentence at relative depth `depth`
    (0 = right after the intro, 1 = right before the question, placed between filler sentences), question."""
    encode = tokenizer.encode_ordinary
    intro, question = encode(PASSKEY_INTRO), encode(PASSKEY_QUESTION)
    needle = encode(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    filler = encode(PASSKEY_FILLER)
    repeats = max(1, (length - len(intro) - len(needle) - len(question)) // len(filler))
    at = round(depth * repeats)
    return intro + filler * at + needle + filler * (repeats - at) + question


def score_answer(text, key):
    """Correct when the first five digits of the answer are the key."""
    digits = "".join(ch for ch in text if ch.isdigit())
    return digits[:5] == str(key)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths, depths, trials, device, autocast, chunk, seed=0):
    """Accuracy[length][depth] over `trials` random keys, greedy decoding through LM.step."""
    rng = np.random.default_rng(seed)
    accuracy = []
    for length in tqdm(lengths, desc="passkey", leave=False):
        row = []
        for depth in depths:
            keys = rng.integers(10000, 100000, size=trials).tolist()
            prompts = [passkey_prompt(tokenizer, length, depth, key) for key in keys]
            correct = []
            # a key's digits may take different numbers of tokens: decode prompts of equal length together
            for size in sorted({len(p) for p in prompts}):
                group = [(p, k) for p, k in zip(prompts, keys) if len(p) == size]
                answers = greedy_answers(model, [p for p, _ in group], 8, device, autocast, chunk)
                correct += [score_answer(tokenizer.decode(a), k) for a, (_, k) in zip(answers, group)]
            row.append(float(np.mean(correct)))
        accuracy.append(row)
    return accuracy


def greedy_answers(model, prompts, new_tokens, device, autocast, chunk):
    """Greedy continuations of equally long prompts (lists of ids), read in chunks then stepped token by token."""
    tokens = torch.tensor(prompts, device=device)
    state = None
    for start in range(0, tokens.shape[1], chunk):
        with autocast:
            logits, _, state = model(tokens[:, start:start + chunk], state=state)
    logits, answers = logits[:, -1], []
    for _ in range(new_tokens):
        next_token = logits.argmax(-1)
        answers.append(next_token)
        with autocast:
            logits, state = model.step(next_token, state)
    return torch.stack(answers, dim=1).tolist()


def evaluate_passkey(checkpoints, tokenizer, args, device, autocast):
    records = []
    for c in checkpoints:
        lengths = args.passkey_lengths or [2 ** k for k in range(int(math.log2(c.T)), int(math.log2(args.len)) + 1)]
        chunk = tokens_per_read(args.chunk, args.passkey_trials * c.model.cfg.vocab_size)
        acc = passkey_accuracy(c.model, tokenizer, lengths, args.passkey_depths, args.passkey_trials, device,
                               autocast, chunk)
        records.append({"path": c.path, "label": c.label, "T": c.T, "lengths": lengths,
                        "depths": args.passkey_depths, "accuracy": acc})
    return records


def plot_passkey(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(4.5 * len(records), 4), squeeze=False)
    for ax, r in zip(axes[0], records):
        image = ax.imshow(np.array(r["accuracy"]).T, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]], rotation=60, fontsize=7)
        ax.set_yticks(range(len(r["depths"])), [f"{d:.2f}" for d in r["depths"]], fontsize=7)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("depth of the key")
        ax.set_title(r["label"], fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def run(args):
    for name in ("len", "num_seqs", "chunk", "bins", "passkey_trials", "effrem_points"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name} must be at least 1")
    device = pick_device(args.device)
    autocast, compute_dtype = autocast_for(device)
    checkpoints = load_all(find_checkpoints(args.ckpt), device, args.backend)
    for checkpoint in checkpoints:
        check_backend(checkpoint.model.cfg, device, compute_dtype)
    if args.effrem:
        longest = max(args.effrem_T or 4 * c.T for c in checkpoints)
        if longest > args.len:
            raise EvalError(f"EffRem with T={longest} needs sequences of at least {longest} tokens: raise --len or "
                            f"lower --effrem_T")
    corpus = load_corpus(args.data or checkpoints[0].corpus.get("name", "stdlib"), args.data_dir)
    if corpus.vocab_size != checkpoints[0].model.cfg.vocab_size:
        raise EvalError(f"corpus '{corpus.name}' has {corpus.vocab_size} tokens but the checkpoints' vocabulary has "
                        f"{checkpoints[0].model.cfg.vocab_size}: give --data with the tokenizer they were trained on")
    sequences, starts = corpus.eval_sequences(args.len, args.num_seqs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"corpus": corpus.name, "split": "val", "len": args.len, "num_seqs": args.num_seqs, "chunk": args.chunk,
              "sequence_starts": starts}

    positions = evaluate_positions(checkpoints, sequences, args, device, autocast)
    _write_json(out / "loss_vs_position.json", {**record, "checkpoints": positions})
    write_csv(positions, out / "loss_vs_position.csv")
    plot_positions(positions, out / "loss_vs_position.png", args.ppl)
    print_summary(positions)
    written = ["loss_vs_position.png", "loss_vs_position.json", "loss_vs_position.csv"]
    if args.effrem:
        effrem = evaluate_effrem(checkpoints, sequences, args, device, autocast)
        _write_json(out / "effrem.json", {**record, "checkpoints": effrem})
        plot_effrem(effrem, out / "effrem.png")
        written += ["effrem.png", "effrem.json"]
    if args.state_stats:
        stats = evaluate_state_stats(checkpoints, sequences, args, device, autocast)
        _write_json(out / "state_stats.json", {**record, "checkpoints": stats})
        plot_state_stats(stats, out / "state_stats.png")
        written += ["state_stats.png", "state_stats.json"]
    if args.passkey:
        passkey = evaluate_passkey(checkpoints, corpus.tokenizer(), args, device, autocast)
        _write_json(out / "passkey.json", {"checkpoints": passkey})
        plot_passkey(passkey, out / "passkey.png")
        written += ["passkey.png", "passkey.json"]
    print("\nwrote " + ", ".join(str(out / name) for name in written))
    return out


def _write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (EvalError, TrainError, DataError) as error:
        sys.exit(f"eval.py: error: {error}")


if __name__ == "__main__":
    main()
