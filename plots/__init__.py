"""plots: the figures and tables of eval.py's diagnostics, drawn from the records it measures (the NAME.json files).

    binned, summary                 how a loss curve is recorded: means in bins of positions (eval.log_bins) over
                                    the sequences that reach each, and in bands of positions

    positions, tabulate_positions   loss (or perplexity) against position, each model beside its control; the CSV
                                    of the curves and a printed table of mean losses in bands of positions
    tabulate_checkpoints            the checkpoints read, printed first
    effrem                          EffRem_T(t) against the tokens removed
    state_stats                     the SSM state's norm and standard deviation against position, per layer
A figure's title names the models, their training length and the text (describe).
"""
import csv
import math
from pathlib import Path

import numpy as np
import torch

from runs import print_table, pyplot

FLOOR = 1e-6  # EffRem values below this are drawn at it: a log axis cannot show 0
SUMMARY_BANDS = (("[T/2,T)", 0.5, 1), ("[2T,8T)", 2, 8), ("[8T,len)", 8, None))


def binned(curves, bins):
    """Per bin [start, end): the mean loss over the sequences that reach its end (curves: loss tensors (n, length),
    the long sequences and the short ones, each sequence weighing the same), the standard error of that mean across
    those sequences, and their number.  (means, standard errors, counts)"""
    means, errors, counts = [], [], []
    for start, end in bins:
        per_seq = torch.cat([c[:, start:end].mean(1) for c in curves if c.shape[1] >= end])
        means.append(per_seq.mean().item())
        errors.append((per_seq.std() / math.sqrt(len(per_seq))).item() if len(per_seq) > 1 else 0.0)
        counts.append(len(per_seq))
    return means, errors, counts


def summary(losses, T):
    """Mean loss in [T/2, T), [2T, 8T) and [8T, len): None for a band the sequences do not cover whole."""
    L = losses.shape[1]
    result = {}
    for name, lo, hi in SUMMARY_BANDS:
        start, end = int(lo * T), L if hi is None else int(hi * T)
        result[name] = losses[:, start:end].mean().item() if start < end <= L else None
    return result


def positions(records, path, reading):
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
    loss, err, counts = np.array(first["loss"]), np.array(first["stderr"]), first["sequences"]
    over = f"the {min(counts)} sequences" if min(counts) == max(counts) else \
        f"each bin's sequences ({min(counts)} long, up to {max(counts)} at short positions)"
    ax.fill_between(_bin_centres(first), transform(loss - err), transform(loss + err), color="C0", alpha=0.12,
                    linewidth=0, zorder=0, label=f"standard error over {over} ({records[0]['label']})")
    ax.set_xscale("log")
    if ppl:
        ax.set_yscale("log")
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format("{x:g}")  # 4, 6, 10 rather than 4 x 10^0
    ax.set_xlabel("token position")
    ax.set_ylabel(f"perplexity (per {per(reading)})" if ppl else f"loss (nats per {per(reading)})")
    ax.set_title(f"Next-token {'perplexity' if ppl else 'loss'} against position, far beyond T\n"
                 f"{describe(reading)}")
    _finish(fig, ax, path)


def _bin_centres(bins):
    return np.sqrt(np.maximum(bins["start"], 1) * np.array(bins["end"]))  # geometric: the middle on a log axis


def tabulate_positions(records, out, reading):
    """The binned curves as CSV, and a table of the summary means printed.  Returns the files written."""
    with open(out / "loss_vs_position.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "label", "bin_start", "bin_end", "sequences", "loss", "stderr", "control"])
        for r in records:
            b = r["bins"]
            for row in zip(b["start"], b["end"], b["sequences"], b["loss"], b["stderr"], b["control"]):
                writer.writerow([r["path"], r["label"], *row])
    print(f"\nmean loss in nats per {per(reading)} over the {reading.args.num_seqs} sequences of {reading.args.len} "
          f"(control: state reset every T)")
    bands = list(records[0]["summary"])
    header = ["model"] + [name.replace("len", str(reading.args.len)) for name in bands]
    rows = [[r["label"]] + [_cell(r["summary"][n], r["control_summary"][n]) for n in bands] for r in records]
    print_table([header] + rows, left=1)
    return ["loss_vs_position.csv"]


def tabulate_checkpoints(checkpoints, title):
    """The checkpoints eval.py reads, printed before it reads them (eval.Checkpoint: label, path, step, init, T)."""
    rows = [[c.label, c.path, "-" if c.step is None else c.step, c.init or "-", c.T] for c in checkpoints]
    print_table([["label", "checkpoint", "step", "init", "T"]] + rows, left=2, title=title, rule=True)


def _cell(value, control):
    return "-" if value is None else f"{value:.3f} ({control:.3f})"


def effrem(records, path, reading):
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
    ax.axhline(FLOOR, color="black", linestyle="-.", linewidth=0.8,
               label=f"floor: values below are shown at {FLOOR:g}")
    ax.set_yscale("log")
    ax.set_xlabel("t: tokens removed from the start of the context")
    ax.set_ylabel(f"EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T]))")
    ax.set_title(f"How much the prediction after T = {T} tokens depends on the first t\n"
                 f"{describe(reading, show_T=False)}")
    _finish(fig, ax, path)


def state_stats(records, path, reading, columns=6):
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
    fig.suptitle(f"The recurrent state against position, per layer\n{describe(reading)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finish(fig, ax, path):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    pyplot().close(fig)


def per(reading):
    """The unit a loss is per: bytes for byte corpora, tokens otherwise."""
    return "byte" if reading.corpus.meta["tokenizer"] == "bytes" else "token"


def describe(reading, show_T=True):
    """'Mamba-2 0.51M, T = 64, stdlib bytes': the models, their training length and the text, for titles."""
    models = " / ".join(dict.fromkeys(_model_name(c.model) for c in reading.checkpoints))
    lengths = " / ".join(dict.fromkeys(str(c.T) for c in reading.checkpoints))
    if reading.task is not None:
        text = f"copy task, {reading.task.alphabet_size} characters, trained on strings of 1 to {reading.task.n_train}"
    else:
        tokenizer = Path(reading.corpus.meta["tokenizer"])  # a hub name or a path: its last part says enough
        name = tokenizer.parent.name if tokenizer.name == "tokenizer.json" else tokenizer.name
        text = f"{reading.corpus.name} {name}"
    return f"{models}, " + (f"trained at T = {lengths}, " if show_T else "") + text


def _model_name(model):
    cfg = model.cfg
    kind = {"mamba2": "Mamba-2", "mamba1": "Mamba-1", "deltanet": "DeltaNet", "gated_deltanet": "Gated DeltaNet",
            "gla": {"channel": "GLA", "head": "GLA (a gate per head)", "none": "linear attention"}[cfg.gate]
            }.get(cfg.mixer, cfg.mixer)
    n = model.num_parameters() / 1e6
    return f"{kind} {n:.2f}M" if n < 10 else f"{kind} {n:.0f}M"
