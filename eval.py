"""eval.py: how a recurrent LM behaves far beyond its training length T.

    python eval.py --len 131072                       every checkpoint under out/, loss against token position
    python eval.py --len 131072 --ckpt out/zero --ckpt out/state_passing --effrem --state_stats
    python eval.py --passkey --ckpt state-spaces/mamba2-370m --data pile-neox --len 16384
                                                      an official Mamba-2 (see pretrained.py), passkey retrieval
    python eval.py --task copy                        copy accuracy of every run under out/copy/ (tasks.py), the
                                                      runs of one name (out/copy/s0/zero, s1/zero, ...) as seeds

The diagnostics of Buitrago Ruiz & Gu (arXiv 2507.02782), Section 3, each measured the same way for every model,
on the same text:
    loss against position (always): --num_seqs validation sequences of --len tokens, read from the zero state with
        the state handed on, the loss averaged over sequences in log-spaced bins. Each model has a control: the
        same model and text with the state reset to zero every T tokens, so it never sees a position beyond T.
        Text gets easier or harder along a sequence; the control moves with the text, the model's own curve also
        with its length generalisation: a model that length-generalises stays at or below its control, a failing
        one rises above it.
    --effrem       Effective Remembrance EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T])), TV = 1/2 sum |p - q|: how
                   much the prediction after T tokens still depends on the first t of them.
    --state_stats  norm and standard deviation of each layer's SSM state against position: states beyond T that
                   training never produced show up as norms that keep growing past the dashed line.
    --passkey      a 5-digit key hidden at depth d of filler text, asked for at the end, answered greedily.
    --task copy    the fraction of characters copied right against the string length (tasks.py); with
                   --state_stats, the state along long copy examples against the range of training examples; with
                   --along_training, accuracy against training step from the ckpt_STEP.pt files (--save_every).
Every forward pass reads at most --chunk tokens (rows x length), so memory stays flat as --len grows.

Outputs in --out (default eval/): NAME.png, NAME.json (the numbers) and for some a .csv, plus a printed table.
Models are named by their run folder (out/zero -> zero) or by --label, in the order given.

Reading order: the measurements (loss and its control, EffRem, state statistics, passkey), what each diagnostic
records and draws, then loading the checkpoints and the command line.
"""
if __name__ == "__main__":  # a Ctrl-C while the imports below load ends quietly, not with a traceback
    import signal
    import sys
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

import cli
import tasks
from cli import UsageError, option
from data import DATA_DIR, load_corpus, tokenizer_mismatch
from model import LM, CheckpointError, check_backend, checkpoint_path, is_checkpoint, load_checkpoint
from tasks import PASSKEY_DEPTHS, PASSKEY_LENGTHS, passkey_prompt, pyplot, score_answer

SUMMARY_BANDS = (("[T/2,T)", 0.5, 1), ("[2T,8T)", 2, 8), ("[8T,len)", 8, None))
LOGITS_BUDGET = 2 ** 26  # logits held at once (256 MB in float32): bounds memory whatever the vocabulary
MIN_BIN = 8  # positions in the first bin: the first tokens of a document (headers, licences) are noisy one by one
FLOOR = 1e-6  # EffRem values below this are drawn at it: a log axis cannot show 0


def piece_length(chunk, rows, vocab_size):
    """Tokens per row in one forward pass, so that rows x length stays within chunk tokens and LOGITS_BUDGET logits:
    the memory of a pass is then bounded whatever the number of rows, the vocabulary or the sequence length."""
    return max(1, min(chunk, LOGITS_BUDGET // vocab_size) // rows)


# ----------------------------------------------------------------------------------------------------------------
# Loss against position, and its control
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def position_losses(model, sequences, chunk, device, autocast, bar=None):
    """Per-position loss (n, L) of sequences (n, L + 1) from the zero state, all rows read together in pieces of at
    most chunk tokens."""
    with autocast:
        return model.loss_per_position(sequences.to(device), piece_length(chunk, len(sequences), model.cfg.vocab_size),
                                       progress=bar)


@torch.no_grad()
def control_losses(model, sequences, T, device, autocast, chunk=8192, bar=None):
    """The control: per-position loss (n, L) of sequences (n, L + 1) with the state reset to zero every T tokens,
    so every position is read with at most T tokens of context, exactly as in training. The sequences are cut into
    independent windows of T tokens (plus the next one as target), read as rows: chunk // T of them per pass, or
    one window in several pieces when T > chunk."""
    n, L = sequences.shape[0], sequences.shape[1] - 1
    padded = torch.nn.functional.pad(sequences, (0, (-L) % T), value=0)  # whole windows; the padding is dropped
    windows = padded.unfold(1, T + 1, T).flatten(0, 1)  # (n * L / T, T + 1), rows in sequence order
    rows = max(1, piece_length(chunk, 1, model.cfg.vocab_size) // T)
    losses = torch.empty(windows.shape[0], T)
    for first in range(0, len(windows), rows):
        losses[first:first + rows] = position_losses(model, windows[first:first + rows], chunk, device, autocast, bar)
    return losses.reshape(n, -1)[:, :L]


def log_bins(length, bins, first=MIN_BIN):
    """Position bins covering [0, length): [0, first), then up to bins - 1 log-spaced bins, none narrower than
    first positions.  [(start, end), ...]"""
    first = min(first, length)
    edges = [0]
    for edge in np.round(np.geomspace(first, length, bins)).astype(int).tolist():
        if edge - edges[-1] >= first:
            edges.append(edge)
    edges[-1] = length  # a last edge closer than first to length widens the last bin
    return list(zip(edges[:-1], edges[1:]))


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


# ----------------------------------------------------------------------------------------------------------------
# Effective Remembrance
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def next_token_distribution(model, tokens, device, autocast, chunk=8192, bar=None):
    """p(. | tokens) for tokens (n, L): the softmax after the last token, read from the zero state in pieces of at
    most chunk tokens.  (n, V)"""
    with autocast:
        for _, _, logits, _ in model.read(tokens.to(device), piece_length(chunk, len(tokens), model.cfg.vocab_size),
                                          progress=bar):
            last = logits[:, -1].float()  # only the last position is needed; the rest is freed with its piece
    return torch.softmax(last, dim=-1)


def effective_remembrance(model, sequences, T, ts, device, autocast, chunk=8192, bar=None):
    """EffRem_T(t) for each t in ts, averaged over sequences (n, >= T): the total-variation distance between the
    next-token distributions after x[0:T] and after x[t:T] (the first t tokens removed).  Returns a list."""
    full = next_token_distribution(model, sequences[:, :T], device, autocast, chunk, bar)
    values = []
    for t in ts:
        partial = full if t == 0 else next_token_distribution(model, sequences[:, t:T], device, autocast, chunk, bar)
        values.append((0.5 * (full - partial).abs().sum(-1)).mean().item())
    return values


# ----------------------------------------------------------------------------------------------------------------
# State statistics
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def state_statistics(model, sequences, positions, chunk, device, autocast, bar=None):
    """Per layer, the Frobenius norm and the standard deviation of the SSM state after each of the given positions
    (in tokens read), averaged over sequences (n, >= max position), all rows read together in pieces of at most
    chunk tokens.  Returns {"norm": [[per position] per layer], "std": ...}."""
    positions = sorted(set(positions))
    tokens = sequences[:, :positions[-1]].to(device)
    norms = [[] for _ in model.backbone.layers]
    stds = [[] for _ in model.backbone.layers]
    with autocast:
        for _, end, _, state in model.read(tokens, piece_length(chunk, len(tokens), model.cfg.vocab_size),
                                           stops=positions, progress=bar):
            if end in positions:
                for i, s in enumerate(state.ssm):
                    flat = s.float().flatten(1)  # (n, H * P * N)
                    norms[i].append(flat.norm(dim=1).mean().item())
                    stds[i].append(flat.std(dim=1).mean().item())
    return {"norm": norms, "std": stds}


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths, depths, trials, device, autocast, chunk, seed=0, bar=None):
    """Accuracy[length][depth] over `trials` random keys, greedy decoding through LM.step."""
    rng = np.random.default_rng(seed)
    accuracy = []
    for length in lengths:
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
                if bar is not None:
                    bar.update(length * len(group))  # the nominal length: the bar ends at its total
            row.append(float(np.mean(correct)))
        accuracy.append(row)
    return accuracy


def greedy_answers(model, prompts, new_tokens, device, autocast, chunk):
    """Greedy continuations of equally long prompts (lists of ids): read in pieces of at most chunk tokens, then
    stepped token by token.  Returns a list of lists of new_tokens ids."""
    tokens = torch.tensor(prompts, device=device)
    with autocast:
        for _, _, logits, state in model.read(tokens, piece_length(chunk, len(tokens), model.cfg.vocab_size)):
            logits = logits[:, -1]
        answers = []
        for _ in range(new_tokens):
            next_token = logits.argmax(-1)
            answers.append(next_token)
            logits, state = model.step(next_token, state)
    return torch.stack(answers, dim=1).tolist()


# ----------------------------------------------------------------------------------------------------------------
# What each diagnostic records (a JSON-ready record per checkpoint) and draws
# ----------------------------------------------------------------------------------------------------------------

def measure_positions(checkpoints, reading):
    sequences, args = reading.sequences, reading.args
    n, L = sequences.shape[0], sequences.shape[1] - 1
    bins = log_bins(L, args.bins)
    records = []
    for c in checkpoints:
        with progress(n * L + n * -(-L // c.T) * c.T, f"{c.label}: loss and control") as bar:
            losses = position_losses(c.model, sequences, args.chunk, reading.device, reading.autocast, bar)
            control = control_losses(c.model, sequences, c.T, reading.device, reading.autocast, args.chunk, bar)
        mean, stderr = binned(losses, bins)
        control_mean, _ = binned(control, bins)
        records.append({**c.record(), "bins": {"start": [b[0] for b in bins], "end": [b[1] for b in bins],
                                               "loss": mean, "stderr": stderr, "control": control_mean},
                        "summary": summary(losses, c.T), "control_summary": summary(control, c.T)})
    return records


def plot_positions(records, path, reading):
    """Loss (or perplexity) against position: per model a line and its control (dotted); the training length
    dashed. Every model reads the same sequences, so their standard errors across sequences are alike (mostly how
    hard each text is): one band, the first model's, shows it."""
    plt = pyplot()
    ppl = reading.args.ppl
    transform = np.exp if ppl else (lambda x: x)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(records):
        x, b = _bin_centres(r["bins"]), r["bins"]
        ax.plot(x, transform(np.array(b["loss"])), color=f"C{i}", linewidth=1.6, label=r["label"])
        ax.plot(x, transform(np.array(b["control"])), color=f"C{i}", linestyle=":", linewidth=1.2)
    for T in dict.fromkeys(r["T"] for r in records):
        ax.axvline(T, color="gray", linestyle="--", linewidth=1)
    ax.plot([], [], color="gray", linestyle=":", linewidth=1.2, label="control: state reset every T")
    ax.plot([], [], color="gray", linestyle="--", linewidth=1, label="training length T (the control's loss jumps "
                                                                     "there: its state restarts)")
    first = records[0]["bins"]
    loss, err = np.array(first["loss"]), np.array(first["stderr"])
    ax.fill_between(_bin_centres(first), transform(loss - err), transform(loss + err), color="C0", alpha=0.12,
                    linewidth=0, zorder=0, label=f"standard error over the {reading.args.num_seqs} sequences "
                                                 f"({records[0]['label']})")
    ax.set_xscale("log")
    if ppl:
        ax.set_yscale("log")
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format("{x:g}")  # 4, 6, 10 rather than 4 x 10^0
    ax.set_xlabel("token position")
    ax.set_ylabel(f"perplexity (per {reading.per})" if ppl else f"loss (nats per {reading.per})")
    ax.set_title(f"Next-token {'perplexity' if ppl else 'loss'} against position, far beyond T\n"
                 f"{reading.description()}")
    _finish(fig, ax, path)


def _bin_centres(bins):
    return np.sqrt(np.maximum(bins["start"], 1) * np.array(bins["end"]))  # geometric: the middle on a log axis


def tabulate_positions(records, out, reading):
    """The binned curves as CSV, and a table of the summary means printed.  Returns the files written."""
    with open(out / "loss_vs_position.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "label", "bin_start", "bin_end", "loss", "stderr", "control"])
        for r in records:
            b = r["bins"]
            for row in zip(b["start"], b["end"], b["loss"], b["stderr"], b["control"]):
                writer.writerow([r["path"], r["label"], *row])
    print(f"\nmean loss in nats per {reading.per} (control: state reset every T)")
    header = ["model"] + [name.replace("len", str(reading.args.len)) for name, _, _ in SUMMARY_BANDS]
    rows = [[r["label"]] + [_cell(r["summary"][n], r["control_summary"][n]) for n, _, _ in SUMMARY_BANDS]
            for r in records]
    tasks.print_table([header] + rows, left=1)
    return ["loss_vs_position.csv"]


def _cell(value, control):
    return "-" if value is None else f"{value:.3f} ({control:.3f})"


def measure_effrem(checkpoints, reading):
    T, args, n = effrem_T(reading.args, checkpoints), reading.args, len(reading.sequences)
    ts = sorted(set(np.linspace(0, T - 1, args.effrem_points).round().astype(int).tolist()))
    records = []
    for c in checkpoints:
        with progress(n * (T + sum(T - t for t in ts if t)), f"{c.label}: EffRem") as bar:
            values = effective_remembrance(c.model, reading.sequences, T, ts, reading.device, reading.autocast,
                                           args.chunk, bar)
        records.append({**c.record(), "train_T": c.T, "T": T, "t": ts, "effrem": values})
    return records


def effrem_T(args, checkpoints):
    """The one T every model's EffRem is measured at: --effrem_T, or 4 x the first model's training length."""
    return args.effrem_T or 4 * checkpoints[0].T


def plot_effrem(records, path, reading):
    plt = pyplot()
    T = records[0]["T"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(records):
        t, e = np.array(r["t"][1:]), np.maximum(np.array(r["effrem"][1:]), FLOOR)  # EffRem_T(0) = 0 by definition
        ax.plot(t, e, color=f"C{i}", marker=".", label=r["label"])
    for train_T in dict.fromkeys(r["train_T"] for r in records):
        ax.axvline(T - train_T, color="gray", linestyle="--", linewidth=1)
    ax.plot([], [], color="gray", linestyle="--", linewidth=1, label="t = T - training length: what is left fits "
                                                                     "in the training length")
    ax.axhline(FLOOR, color="black", linestyle="-.", linewidth=0.8, label=f"floor: values below are shown at {FLOOR:g}")
    ax.set_yscale("log")
    ax.set_xlabel("t: tokens removed from the start of the context")
    ax.set_ylabel(f"EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T]))")
    ax.set_title(f"How much the prediction after T = {T} tokens depends on the first t\n"
                 f"{reading.description(show_T=False)}")
    _finish(fig, ax, path)


def measure_state_stats(checkpoints, reading):
    """The state along the evaluation text; for a copy task, along copy examples of strings 4 n_train long, with
    the largest norm reached along examples of the longest training strings (the range training saw)."""
    if reading.task is not None:
        return measure_copy_states(checkpoints, reading)
    n, L = reading.sequences.shape[0], reading.sequences.shape[1] - 1
    positions = np.unique(np.round(np.geomspace(1, L, 40)).astype(int)).tolist()
    records = []
    for c in checkpoints:
        with progress(n * L, f"{c.label}: state statistics") as bar:
            stats = state_statistics(c.model, reading.sequences, positions, reading.args.chunk, reading.device,
                                     reading.autocast, bar)
        records.append({**c.record(), "positions": positions, **stats})
    return records


def measure_copy_states(checkpoints, reading):
    task, args = reading.task, reading.args
    long = task.sequences(task.eval_strings(4 * task.n_train, args.copy_strings))  # (S, 8 n_train + 3)
    trained = task.sequences(task.eval_strings(task.n_train, args.copy_strings))  # (S, 2 n_train + 3)
    records = []
    for c in checkpoints:
        stats = state_statistics(c.model, long, range(1, long.shape[1] + 1), args.chunk, reading.device,
                                 reading.autocast)
        seen = state_statistics(c.model, trained, range(1, trained.shape[1] + 1), args.chunk, reading.device,
                                reading.autocast)
        records.append({**c.record(), "positions": list(range(1, long.shape[1] + 1)), **stats,
                        "training_range": [max(layer) for layer in seen["norm"]]})
    return records


def plot_state_stats(records, path, reading, columns=6):
    """One panel per layer (at most `columns` per row), the models overlaid (seeds of one model averaged): the
    state's norm in one row of panels, its standard deviation in the row below. For a copy task, the largest norm
    along training-length examples is a dashed line of the model's colour."""
    plt = pyplot()
    models = {}
    for r in records:
        models.setdefault(r["model"], []).append(r)
    layers = max(len(r["norm"]) for r in records)
    ncols = min(columns, layers)
    groups = math.ceil(layers / ncols)
    fig, axes = plt.subplots(2 * groups, ncols, figsize=(3.3 * ncols, 2.9 * 2 * groups), squeeze=False, sharex=True)
    for ax in axes.flat:
        ax.set_visible(False)
    for layer in range(layers):
        for offset, key in enumerate(("norm", "std")):
            ax = axes[2 * (layer // ncols) + offset, layer % ncols]
            ax.set_visible(True)
            for i, (name, seeds) in enumerate(models.items()):
                if layer < len(seeds[0][key]):
                    ax.plot(seeds[0]["positions"], np.mean([s[key][layer] for s in seeds], 0), color=f"C{i}",
                            label=name)
                    if key == "norm" and "training_range" in seeds[0]:
                        ax.axhline(np.mean([s["training_range"][layer] for s in seeds]), color=f"C{i}",
                                   linestyle="--", linewidth=0.8)
            for T in dict.fromkeys(r["T"] for r in records):
                ax.axvline(T, color="gray", linestyle="--", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"layer {layer}: state {key}", fontsize=9)
            ax.grid(alpha=0.3)
            if offset == 1:
                ax.set_xlabel("token position")
    axes[0, 0].plot([], [], color="gray", linestyle="--", linewidth=0.8, label="training length T")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"The recurrent state against position, per layer\n{reading.description()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_passkey(checkpoints, reading):
    args, tokenizer = reading.args, reading.corpus.tokenizer()
    records = []
    for c in checkpoints:
        total = sum(args.passkey_lengths) * len(args.passkey_depths) * args.passkey_trials
        with progress(total, f"{c.label}: passkey") as bar:
            accuracy = passkey_accuracy(c.model, tokenizer, args.passkey_lengths, args.passkey_depths,
                                        args.passkey_trials, reading.device, reading.autocast, args.chunk, bar=bar)
        records.append({**c.record(), "lengths": args.passkey_lengths, "depths": args.passkey_depths,
                        "accuracy": accuracy})
    return records


def plot_passkey(records, path, reading):
    """A heatmap per model: accuracy per (prompt length, depth of the key), each cell labelled with its value."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(records), figsize=(4.2 * len(records) + 1, 4.2), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, r in zip(axes[0], records):
        accuracy = np.array(r["accuracy"]).T  # (depths, lengths)
        image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for (row, column), value in np.ndenumerate(accuracy):
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
        ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]], rotation=60, fontsize=7)
        ax.set_yticks(range(len(r["depths"])), [f"{d:.2f}" for d in r["depths"]], fontsize=7)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(r["label"], fontsize=9)
    axes[0, 0].set_ylabel("depth of the key")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"Passkey retrieval: is the 5-digit key found?\n{reading.description()}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_copy(checkpoints, reading):
    """Per checkpoint (one seed of a model), greedy and teacher-forced accuracy at every length, each with its
    standard error over the strings (tasks.copy_accuracy)."""
    task, args = reading.task, reading.args
    lengths = args.copy_lengths or list(range(1, 4 * task.n_train + 1))
    records = []
    for c in checkpoints:
        record = {**c.record(), "n_train": task.n_train, "lengths": lengths, "greedy": [], "greedy_stderr": [],
                  "teacher_forced": [], "teacher_forced_stderr": []}
        with progress(sum(args.copy_strings * (2 * n + 3) for n in lengths), f"{c.label}: copying") as bar:
            for n in lengths:  # one length at a time, for the bar
                with reading.autocast:
                    scores = tasks.copy_accuracy(c.model, task, [n], args.copy_strings, device=reading.device)[n]
                for kind, value in zip(("greedy", "greedy_stderr", "teacher_forced", "teacher_forced_stderr"), scores):
                    record[kind].append(value)
                bar.update(args.copy_strings * (2 * n + 3))
        records.append(record)
    return records


def plot_copy(records, path, reading):
    tasks.plot_copy(tasks.copy_models(records), path, reading.description())


def tabulate_copy(records, out, reading):
    tasks.tabulate_copy(tasks.copy_models(records), out / "copy_accuracy.csv", reading.args.copy_strings)
    return ["copy_accuracy.csv"]


def measure_along_training(checkpoints, reading):
    """Copy accuracy of every checkpoint a run kept along its training (ckpt_STEP.pt, and its ckpt.pt when that is
    a later step), each record with its step; a run's copies are seeds of the run's model name."""
    along = []
    for c in checkpoints:
        copies = sorted(c.folder.glob("ckpt_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        kept = [Checkpoint(str(p), reading.device, label=c.name, train_len=c.T) for p in copies]
        along += kept + ([c] if c.step not in [k.step for k in kept] else [])
    return measure_copy(along, reading)


def plot_along_training(records, path, reading):
    tasks.plot_along_training(tasks.along_training(records), path, reading.description())


def tabulate_along_training(records, out, reading):
    models = tasks.along_training(records)
    print("\ngreedy copy accuracy beyond the training lengths against training step, mean ± std across seeds")
    for m in models:
        tasks.print_table([["step"] + [str(s) for s in m["steps"]],
                           [m["label"]] + [f"{x:.3f} ± {s:.3f}" for x, s in zip(m["greedy_beyond"],
                                                                                m["greedy_beyond_std"])]])
    return []


def _finish(fig, ax, path):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    pyplot().close(fig)


def progress(total, desc):
    """A bar counting tokens read, left on screen when done."""
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)


@dataclass
class Diagnostic:
    """One thing eval.py measures: the flag that asks for it, how it is measured and drawn, and an optional table.
    Writes NAME.json (the records) and NAME.png."""
    name: str
    flag: Optional[str]  # None: always on
    measure: Callable  # (checkpoints, reading) -> a JSON-ready record per checkpoint
    plot: Callable  # (records, path, reading)
    tabulate: Optional[Callable] = None  # (records, out folder, reading) -> names of the extra files written
    summarise: Optional[Callable] = None  # records -> the JSON's "models": what the records say per model
    tasks: tuple = ("lm",)  # what the models must have been trained on: lm (text) or a task of tasks.py


DIAGNOSTICS = [
    Diagnostic("loss_vs_position", None, measure_positions, plot_positions, tabulate_positions),
    Diagnostic("effrem", "effrem", measure_effrem, plot_effrem),
    Diagnostic("state_stats", "state_stats", measure_state_stats, plot_state_stats, tasks=("lm", "copy")),
    Diagnostic("passkey", "passkey", measure_passkey, plot_passkey),
    Diagnostic("copy_accuracy", None, measure_copy, plot_copy, tabulate_copy, tasks.copy_models, tasks=("copy",)),
    Diagnostic("copy_along_training", "along_training", measure_along_training, plot_along_training,
               tabulate_along_training, tasks.along_training, tasks=("copy",)),
]


# ----------------------------------------------------------------------------------------------------------------
# Loading the checkpoints and the text they are read on
# ----------------------------------------------------------------------------------------------------------------

class Checkpoint:
    """A trained model with what the evaluation needs to know about it: its name, training length T, recipe.
    spec: a checkpoint of this project, or anything LM.from_pretrained reads (an official Mamba-2)."""

    def __init__(self, spec, device, backend=None, label=None, train_len=None):
        self.folder, self.pretrained = Path(spec), not is_checkpoint(spec)  # the folder (or hub name) naming it
        if self.pretrained:
            self.model = LM.from_pretrained(spec, device, backend=backend)
            self.path, self.args, self.step = self.model.trained_on["source"], {}, None
        else:
            ckpt = load_checkpoint(spec)
            self.model = LM.from_checkpoint(ckpt, device, backend=backend)
            self.path, self.args, self.step = str(checkpoint_path(spec)), ckpt.get("args") or {}, ckpt.get("step")
            self.folder = Path(self.path).resolve().parent
        self.init, self.task = self.args.get("init"), self.args.get("task", "lm")
        if getattr(tasks.TASKS.get(self.task), "needs_tokenizer", False):  # fine-tuned on a task made of text
            self.task = "lm"  # (passkey): still a language model, read on a corpus of its tokens
        self.T = self.model.trained_on["seq_len"] or train_len
        if not self.T:
            raise CheckpointError(f"{spec} does not record its training length: give it as --train_len T")
        # name: the model this checkpoint is a run of (copy evaluations average the runs of one name as seeds);
        # label: the checkpoint itself, told apart from others of its name by load_all
        self.name = self.label = label or self.folder.name

    def record(self):
        """What every diagnostic's JSON says of this checkpoint."""
        return {"path": self.path, "label": self.label, "model": self.name, "init": self.init, "T": self.T,
                "step": self.step}


def find_checkpoints(paths, task=None):
    """The --ckpt paths, or every run under out/ that has a checkpoint; for a task, under out/TASK/, also one level
    deeper (seeds: out/copy/s0/zero, out/copy/s1/zero, ...). Runs named zero (the baseline) first, then by name."""
    if paths:
        return paths
    root = Path("out", *([] if task in (None, "lm") else [task]))
    patterns = ["*/ckpt.pt"] + ([] if task in (None, "lm") else ["*/*/ckpt.pt"])
    found = sorted((str(p.parent) for pattern in patterns for p in root.glob(pattern)),
                   key=lambda p: (Path(p).name != "zero", Path(p).name, p))
    if not found:
        train = "python train.py" + ("" if task in (None, "lm") else f" --task {task}")
        raise UsageError(f"no checkpoints under {root}/: train one first ({train}) or give --ckpt PATH")
    return found


def load_all(paths, labels, device, backend, train_len=None):
    if labels and len(labels) != len(paths):
        raise UsageError(f"{len(labels)} --label for {len(paths)} --ckpt: give one --label per --ckpt, or none")
    checkpoints = [Checkpoint(p, device, backend, label, train_len)
                   for p, label in zip(paths, labels or [None] * len(paths))]
    known = [c for c in checkpoints if c.model.trained_on["tokenizer"]]
    for c in known[1:]:
        if tokenizer_mismatch(known[0].model.trained_on, c.model.trained_on):
            first, other = known[0].model.trained_on["tokenizer"], c.model.trained_on["tokenizer"]
            raise UsageError(f"{known[0].label} and {c.label} read different tokens ({first}, {other}), so they "
                             f"cannot be compared on the same text: evaluate them separately")
    names = [c.label for c in checkpoints]
    for c in checkpoints:  # two runs called zero in different folders: out/a/zero, out/b/zero -> a/zero, b/zero
        if names.count(c.label) > 1:
            c.label = "/".join(c.folder.parts[-2:])
    return checkpoints


@dataclass
class Reading:
    """What every diagnostic reads with: the options, the device, the models, and the evaluation text (a corpus and
    its sequences) or the synthetic task."""
    args: object
    device: torch.device
    autocast: object
    checkpoints: list
    corpus: object = None  # data.Corpus
    sequences: torch.Tensor = None  # (num_seqs, len + 1) int64, on the CPU
    task: object = None  # a task of tasks.py

    @property
    def per(self):
        """The unit a loss is per: bytes for byte corpora, tokens otherwise."""
        return "byte" if self.corpus.meta["tokenizer"] == "bytes" else "token"

    def description(self, show_T=True):
        """'Mamba-2 0.51M, T = 64, stdlib bytes': the models, their training length and the text, for titles."""
        models = " / ".join(dict.fromkeys(_model_name(c.model) for c in self.checkpoints))
        lengths = " / ".join(dict.fromkeys(str(c.T) for c in self.checkpoints))
        if self.task is not None:
            text = f"copy task, {self.task.alphabet_size} characters, trained on strings of 1 to {self.task.n_train}"
        else:
            tokenizer = Path(self.corpus.meta["tokenizer"])  # a hub name or a path: its last part says enough
            name = tokenizer.parent.name if tokenizer.name == "tokenizer.json" else tokenizer.name
            text = f"{self.corpus.name} {name}"
        return f"{models}, " + (f"trained at T = {lengths}, " if show_T else "") + text


def _model_name(model):
    cfg = model.cfg
    kind = {"mamba2": "Mamba-2", "mamba1": "Mamba-1"}.get(cfg.mixer) or {
        "channel": "GLA", "head": "GLA (a gate per head)", "none": "linear attention"}[cfg.gate]
    n = model.num_parameters() / 1e6
    return f"{kind} {n:.2f}M" if n < 10 else f"{kind} {n:.0f}M"


def the_task(args, checkpoints):
    """What the models were trained on ("lm" or a task's name), the same for all and as --task says if given."""
    trained = dict.fromkeys(c.task for c in checkpoints)
    if len(trained) > 1:
        raise UsageError(f"these checkpoints were trained on different things ({', '.join(trained)}): evaluate them "
                         f"separately")
    task = next(iter(trained))
    if args.task not in (None, task):
        raise UsageError(f"--task {args.task}, but {checkpoints[0].label} was trained on {task}: give --task {task} "
                         f"or other checkpoints")
    return task


def prepare_text(reading):
    """The corpus and its evaluation sequences, refused in one line when a model cannot read them.  Returns what
    the outputs record about them."""
    args, checkpoints = reading.args, reading.checkpoints
    short = next((c for c in checkpoints if args.len < c.T), None)
    if short:
        raise UsageError(f"--len {args.len} is shorter than the training length T = {short.T} of {short.label}: "
                         f"the point is to read beyond T; raise --len")
    if args.effrem and effrem_T(args, checkpoints) > args.len:
        T = effrem_T(args, checkpoints)
        raise UsageError(f"EffRem with T={T} needs sequences of at least {T} tokens: raise --len or lower --effrem_T")
    foreign = next((c for c in checkpoints if c.pretrained or c.args.get("task", "lm") != "lm"), None)
    if foreign and not args.data:  # an official model, or one fine-tuned on a task of text, names no corpus
        raise UsageError(f"{foreign.label} was not trained on a corpus of this project: give --data, a corpus "
                         f"prepared with its tokenizer (python data.py --input ... --tokenizer "
                         f"{foreign.model.trained_on['tokenizer'] or '...'})")
    corpus = load_corpus(args.data or checkpoints[0].model.trained_on["corpus"] or "stdlib", args.data_dir)
    for c in checkpoints:
        mismatch = tokenizer_mismatch(corpus.meta, c.model.trained_on)
        if mismatch:
            raise UsageError(f"{c.label}: {mismatch}: give --data, a corpus prepared with the model's tokenizer")
        if corpus.vocab_size > c.model.cfg.vocab_size:
            raise UsageError(f"corpus '{corpus.name}' has {corpus.vocab_size} tokens but {c.label} knows only "
                             f"{c.model.cfg.vocab_size}: give --data, a corpus prepared with the model's tokenizer")
    if args.ppl is None:
        args.ppl = corpus.meta["tokenizer"] != "bytes"
    reading.corpus = corpus
    reading.sequences, starts = corpus.eval_sequences(args.len, args.num_seqs)
    return {"corpus": corpus.name, "split": "val", "len": args.len, "num_seqs": args.num_seqs, "chunk": args.chunk,
            "sequence_starts": starts}


def prepare_task(reading, name):
    """The task the models were trained on, with their own settings (the same for all).  Returns its record."""
    try:
        found = [tasks.make_task(name, c.args) for c in reading.checkpoints]
    except (ValueError, TypeError) as error:
        raise UsageError(f"--task {name}: {error}") from None
    settings = [vars(t) for t in found]
    if any(s != settings[0] for s in settings):
        raise UsageError(f"these checkpoints were trained on different {name} tasks: evaluate them separately")
    reading.task = found[0]
    return {"task": name, **{k: v for k, v in settings[0].items() if isinstance(v, (int, float, type(None)))}}


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """eval.py's options (cli.option: default, help, marks); the command line is generated from them."""
    ckpt: list = option(None, "checkpoint file or run folder, an official Mamba-2 (hub name such as "
                              "state-spaces/mamba2-370m, or a folder with config.json); repeat for several (default: "
                              "every out/*/ckpt.pt, out/zero first; with --task copy, out/copy/* and out/copy/*/*)",
                        type=str, action="append")
    label: list = option(None, "the name of each --ckpt in legends and tables, in the same order (default: its run "
                               "folder's name); with --task copy, checkpoints of one name are seeds of one model",
                         type=str, action="append")
    task: str = option(None, "lm: text from a corpus; copy: tasks.py's copy task (default: what the checkpoints "
                             "were trained on)", type=str, choices=("lm", "copy"))
    train_len: int = option(None, "the training length T of models that do not record it", type=int)
    len: int = option(131072, "tokens per evaluation sequence", most=2 ** 24)
    num_seqs: int = option(8, "evaluation sequences", most=4096)
    chunk: int = option(8192, "tokens read by one forward pass, all rows together; the state is handed on "
                              "(lowered for large vocabularies: logits stay under 256 MB)", most=2 ** 22)
    out: str = option("eval", "output folder")
    data: str = option(None, "corpus to read (default: the one the first checkpoint was trained on)", type=str)
    data_dir: str = option(str(DATA_DIR), "where corpora live")
    ppl: bool = option(None, "plot perplexity on a log axis instead of loss (default: perplexity unless the corpus "
                             "is byte tokens)", type=bool)
    bins: int = option(48, "log-spaced bins of the curves", most=4096)
    effrem: bool = option(False, "Effective Remembrance")
    effrem_T: int = option(None, "the T of EffRem_T (default: 4 x the first model's training length)", type=int,
                           least=2, most=2 ** 24)
    effrem_points: int = option(33, "values of t on the EffRem grid", most=4096)
    state_stats: bool = option(False, "SSM state norm and std against position")
    passkey: bool = option(False, "passkey retrieval heatmap")
    passkey_lengths: tuple = option(PASSKEY_LENGTHS, "prompt lengths in tokens (default, the paper's: 2048, "
                                   "4096, ..., 262144)", type=int, nargs="+", most=2 ** 22)
    passkey_depths: tuple = option(PASSKEY_DEPTHS, "relative depths of the key in [0, 1] (default, the "
                                  "paper's: 0.1 0.5 0.9)", type=float, nargs="+", zero_ok=True, most=1)
    passkey_trials: int = option(4, "random keys per (length, depth) cell", most=10000)
    copy_lengths: list = option(None, "string lengths to copy (default: every length from 1 to 4 n_train)",
                                type=int, nargs="+", most=4096)
    copy_strings: int = option(256, "strings per length (256: a standard error over strings of at most 0.031 per "
                                    "length)", most=4096)
    along_training: bool = option(False, "copy: accuracy against training step, from the ckpt_STEP.pt files a run "
                                         "kept (train.py --save_every)")
    device: str = option("auto", "cpu, cuda, ... (default: cuda when available)")
    backend: str = option(None, "scan implementation (default: auto)", type=str, choices=("auto", "torch", "triton"))


def parse(argv):
    """The options: the flags given, EvalConfig's defaults for the rest, each checked."""
    parser = cli.OneLineParser("eval.py", __doc__)
    cli.add_options(parser, EvalConfig, "options")
    given = cli.given(parser.parse_args(argv), EvalConfig)
    cli.check(EvalConfig, given)
    args = EvalConfig(**given)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file: give a folder for the outputs")
    return args


def evaluate(args):
    device = cli.pick_device(args.device)
    autocast, compute_dtype = cli.autocast_for(device)
    checkpoints = load_all(find_checkpoints(args.ckpt, args.task), args.label, device, args.backend, args.train_len)
    for checkpoint in checkpoints:
        check_backend(checkpoint.model.cfg, device, compute_dtype)
    task = the_task(args, checkpoints)
    elsewhere = [f"--{d.flag}" for d in DIAGNOSTICS if d.flag and getattr(args, d.flag) and task not in d.tasks]
    if elsewhere:
        raise UsageError(f"{', '.join(elsewhere)} cannot be measured on these checkpoints, trained on {task}")
    reading = Reading(args, device, autocast, checkpoints)
    record = prepare_text(reading) if task == "lm" else prepare_task(reading, task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # now: an unwritable folder fails before hours of reading
    written = []
    for d in DIAGNOSTICS:
        if task not in d.tasks or (d.flag and not getattr(args, d.flag)):
            continue
        records = d.measure(checkpoints, reading)
        models = {"models": d.summarise(records)} if d.summarise else {}
        _write_json(out / f"{d.name}.json", {**record, "checkpoints": records, **models})  # the numbers first
        d.plot(records, out / f"{d.name}.png", reading)
        written += [f"{d.name}.png", f"{d.name}.json"] + (d.tabulate(records, out, reading) if d.tabulate else [])
    print("\nwrote " + ", ".join(str(out / name) for name in written))
    return out


def _write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None):
    return cli.run("eval.py", lambda argv: evaluate(parse(argv)), argv)


if __name__ == "__main__":
    main()
