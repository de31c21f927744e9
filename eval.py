"""eval.py: how a recurrent LM behaves far beyond its training length T.

    python eval.py --len 131072                       every checkpoint under out/, loss against token position
    python eval.py --len 131072 --ckpt out/zero --ckpt out/state_passing --effrem --state_stats
    python eval.py --passkey --ckpt state-spaces/mamba2-370m --data pile-neox --len 16384
                                                      an official Mamba-2 (see pretrained.py), passkey retrieval
    python eval.py --task copy                        copy accuracy of every run under out/copy/ (tasks.py), the
                                                      runs of one name (out/copy/s0/zero, s1/zero, ...) as seeds

Loss against position (always). --num_seqs sequences of --len tokens from the validation split, the same ones for
every checkpoint (a fixed, document-aligned choice recorded in the output), read from the zero state with the state
handed on. Every forward pass reads at most --chunk tokens (rows x length) whatever --len, --num_seqs or the
vocabulary, so memory stays constant as --len grows. The per-position loss is averaged over sequences and smoothed
in bins (the first 8 positions together, then log-spaced); a band shows the first model's standard error.
Each model also gets a control: the same model and text with the state reset to zero every T tokens, so it never
sees a position beyond T. Text gets easier or harder along a sequence; the control moves with the text, the model's
own curve also with its length generalisation: a model that length-generalises stays at or below its control, a
failing one rises above it. Byte corpora are plotted in nats per byte, others as perplexity (--ppl / --no-ppl).

Diagnostics of the paper, each a row of DIAGNOSTICS (its flag, what it measures, how it is drawn):
    --effrem       Effective Remembrance EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T])), TV = 1/2 sum |p - q|:
                   how much the prediction after T tokens still depends on the first t of them. A model that has
                   learnt to forget stays near 0 until t approaches T; one overly tied to the distant past does not.
                   One T for every model (--effrem_T, default 4 x the first model's training length).
    --state_stats  norm and standard deviation of each layer's SSM state against position: states beyond T that
                   training never produced show up as norms that keep growing past the dashed line.
    --passkey      a 5-digit key hidden at relative depth d of filler text, asked for at the end, answered by greedy
                   decoding through LM.step (prompts and scoring: tasks.py). Only meaningful for models trained on
                   natural language (with the default byte-level code corpus it measures nothing a reader should
                   trust). The paper's grid by default: depths 0.1, 0.5, 0.9 of prompts of 2k to 256k tokens.
    --task copy    (models trained by train.py --task copy) the fraction of characters copied right against the
                   string length, greedy through LM.step and teacher-forced, on fixed strings: copy_accuracy.png,
                   .json, .csv and tables. Checkpoints of one name (--label, or the run folder: out/copy/s0/zero,
                   out/copy/s1/zero, ...) are seeds of one model: per model, the mean over seeds +- the std across
                   them, per length and within (n <= n_train) and beyond (n_train < n <= 4 n_train) training, and
                   the largest standard error over strings (a warning when it reaches 0.02).

Outputs in --out (default eval/): loss_vs_position.png, loss_vs_position.json (per checkpoint: the binned curve,
its control and the summary means) and .csv, plus effrem.png/.json, state_stats.png/.json and passkey.png/.json
when asked. A summary table of mean loss in [T/2, T), [2T, 8T) and [8T, len) is printed. Models are named by their
run folder (out/zero -> zero) or by --label, one per --ckpt, in the order given.
"""
import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DATA_DIR, DataError, load_corpus, tokenizer_mismatch
from model import (LM, CheckpointError, OneLineParser, UsageError, autocast_for, check_backend, checkpoint_path,
                   load_checkpoint, pick_device)
from tasks import (PASSKEY_DEPTHS, PASSKEY_LENGTHS, TASKS, copy_accuracy, make_task, passkey_prompt, score_answer,
                   teacher_forced_accuracy)

SUMMARY_BANDS = (("[T/2,T)", 0.5, 1), ("[2T,8T)", 2, 8), ("[8T,len)", 8, None))
LOGITS_BUDGET = 2 ** 26  # logits held at once (256 MB in float32): bounds memory whatever the vocabulary
MIN_BIN = 8  # positions in the first bin: the first tokens of a document (headers, licences) are noisy one by one
FLOOR = 1e-6  # EffRem values below this are drawn at it: a log axis cannot show 0


class EvalError(UsageError):
    """A problem with the user's options, told in one line that says what to do."""


def build_parser():
    p = OneLineParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    p.add_argument("--ckpt", action="append", help="checkpoint file or run folder, an official Mamba-2 (Hugging "
                   "Face name such as state-spaces/mamba2-370m, or a folder with config.json); repeat for several "
                   "(default: every out/*/ckpt.pt, out/zero first; with --task copy, out/copy/* and out/copy/*/*)")
    p.add_argument("--label", action="append", help="the name of each --ckpt in legends and tables, in the same "
                   "order (default: its run folder's name); with --task copy, checkpoints of one name are seeds "
                   "of one model, reported as mean +- std")
    p.add_argument("--task", choices=("lm", *(n for n, t in TASKS.items() if not getattr(t, "needs_tokenizer", False))), help="lm: text from a corpus; copy: tasks.py's copy task "
                   "(default: what the checkpoints were trained on)")
    p.add_argument("--train_len", type=int, help="the training length T of models that do not record it")
    p.add_argument("--len", type=int, default=131072, help="tokens per evaluation sequence (default 131072)")
    p.add_argument("--num_seqs", type=int, default=8, help="evaluation sequences (default 8)")
    p.add_argument("--chunk", type=int, default=8192, help="tokens read by one forward pass, all rows together; "
                                                          "the state is handed on (lowered for large vocabularies: "
                                                          "logits stay under 256 MB)")
    p.add_argument("--out", default="eval", help="output folder (default eval/)")
    p.add_argument("--data", help="corpus to read (default: the one the first checkpoint was trained on)")
    p.add_argument("--data_dir", default=str(DATA_DIR))
    p.add_argument("--ppl", action=argparse.BooleanOptionalAction, help="plot perplexity on a log axis instead of "
                   "loss (default: perplexity unless the corpus is byte tokens)")
    p.add_argument("--bins", type=int, default=48, help="log-spaced bins of the curves")
    p.add_argument("--effrem", action="store_true", help="Effective Remembrance")
    p.add_argument("--effrem_T", type=int, help="the T of EffRem_T (default: 4 x the first model's training length)")
    p.add_argument("--effrem_points", type=int, default=33, help="values of t on the EffRem grid")
    p.add_argument("--state_stats", action="store_true", help="SSM state norm and std against position")
    p.add_argument("--passkey", action="store_true", help="passkey retrieval heatmap")
    p.add_argument("--passkey_lengths", type=int, nargs="+", default=list(PASSKEY_LENGTHS),
                   help="prompt lengths in tokens (default, the paper's: 2048, 4096, ..., 262144)")
    p.add_argument("--passkey_depths", type=float, nargs="+", default=list(PASSKEY_DEPTHS),
                   help="relative depths of the key (default, the paper's: 0.1 0.5 0.9)")
    p.add_argument("--passkey_trials", type=int, default=4, help="random keys per (length, depth) cell")
    p.add_argument("--copy_lengths", type=int, nargs="+", help="string lengths to copy (default: every length "
                   "from 1 to 4 n_train)")
    p.add_argument("--copy_strings", type=int, default=256, help="strings per length (default 256: a standard "
                   "error over strings of at most 0.5 / 16 = 0.031 per length, in practice below 0.02)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), help="scan implementation (default: auto)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

class Checkpoint:
    """A trained model with what the evaluation needs to know about it: its name, training length T, recipe.
    spec: a checkpoint of this project, or anything LM.from_pretrained reads (an official Mamba-2)."""

    def __init__(self, spec, device, backend=None, label=None, train_len=None):
        self.folder, self.pretrained = Path(spec), is_pretrained(spec)  # the folder (or Hub name) that names it
        if self.pretrained:
            self.model = LM.from_pretrained(spec, device, backend=backend)
            self.path, self.args, self.step = self.model.trained_on["source"], {}, None
        else:
            ckpt = load_checkpoint(spec)
            self.model = LM.from_checkpoint(ckpt, device, backend=backend)
            self.path, self.args, self.step = str(checkpoint_path(spec)), ckpt.get("args") or {}, ckpt.get("step")
            self.folder = Path(self.path).resolve().parent
        self.init, self.task = self.args.get("init"), self.args.get("task", "lm")
        if getattr(TASKS.get(self.task), "needs_tokenizer", False):  # fine-tuned on a task made of text (passkey):
            self.task = "lm"  # still a language model, read on a corpus of its tokens
        self.T = self.model.trained_on["seq_len"] or train_len
        if not self.T:
            raise CheckpointError(f"{spec} does not record its training length: give it as --train_len T")
        # name: the model this checkpoint is a run of (copy evaluations average the runs of one name as seeds);
        # label: the checkpoint itself, told apart from others of its name by load_all
        self.name = self.label = label or self.folder.name


def is_pretrained(spec):
    """Whether --ckpt names a model for LM.from_pretrained: a folder with config.json, or a Hugging Face name
    (org/name where neither the path nor its parent folder exists here). Anything else is a project checkpoint,
    whose errors say what is missing."""
    path = Path(spec)
    if checkpoint_path(spec).is_file():
        return False
    return (path / "config.json").is_file() or not (path.exists() or path.parent.exists())


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
        raise EvalError(f"no checkpoints under {root}/: train one first (python train.py) or give --ckpt PATH")
    return found


def load_all(paths, labels, device, backend, train_len=None):
    if labels and len(labels) != len(paths):
        raise EvalError(f"{len(labels)} --label for {len(paths)} --ckpt: give one --label per --ckpt, or none")
    checkpoints = [Checkpoint(p, device, backend, label, train_len)
                   for p, label in zip(paths, labels or [None] * len(paths))]
    known = [c for c in checkpoints if c.model.trained_on["tokenizer"]]
    for c in known[1:]:
        if tokenizer_mismatch(known[0].model.trained_on, c.model.trained_on):
            first, other = known[0].model.trained_on["tokenizer"], c.model.trained_on["tokenizer"]
            raise EvalError(f"{known[0].label} and {c.label} read different tokens ({first}, {other}), so they "
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
    args: argparse.Namespace
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

    def description(self):
        """'Mamba-2 0.51M, T = 64, stdlib bytes': the models, their training length and the text, for titles."""
        models = dict.fromkeys(_model_name(c.model) for c in self.checkpoints)
        lengths = dict.fromkeys(str(c.T) for c in self.checkpoints)
        if self.task is not None:
            text = f"copy task, {self.task.alphabet_size} characters, trained on strings of 1 to {self.task.n_train}"
        else:
            tokenizer = Path(self.corpus.meta["tokenizer"])  # a hub name or a path: its last part says enough
            name = tokenizer.parent.name if tokenizer.name == "tokenizer.json" else tokenizer.name
            text = f"{self.corpus.name} {name}"
        return f"{' / '.join(models)}, T = {' / '.join(lengths)}, {text}"


def _model_name(model):
    cfg = model.cfg
    kind = {"mamba2": "Mamba-2"}.get(cfg.mixer) or ("GLA" if cfg.gate == "data" else "linear attention")
    n = model.num_parameters() / 1e6
    return f"{kind} {n:.2f}M" if n < 10 else f"{kind} {n:.0f}M"


def progress(total, desc):
    """A bar counting tokens read, left on screen when done."""
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)


def piece_length(chunk, rows, vocab_size):
    """Tokens per row in one forward pass, so that rows x length stays within chunk tokens and LOGITS_BUDGET logits:
    the memory of a pass is then bounded whatever the number of rows, the vocabulary or the sequence length."""
    return max(1, min(chunk, LOGITS_BUDGET // vocab_size) // rows)


# ----------------------------------------------------------------------------------------------------------------
# Loss against position
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def position_losses(model, sequences, chunk, device, autocast, bar=None):
    """Per-position loss (n, L) of sequences (n, L + 1) from the zero state, all rows read together in pieces of
    at most chunk tokens."""
    tokens = sequences.to(device)
    # filled in place: small pieces kept alive between the large temporaries of each pass would fragment the heap,
    # and the process would keep growing with L although the tensors alive do not
    losses = torch.empty(tokens.shape[0], tokens.shape[1] - 1)
    with autocast:
        for start, end, logits, _ in model.read(tokens[:, :-1], piece_length(chunk, len(tokens), model.cfg.vocab_size)):
            losses[:, start:end] = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, start + 1:end + 1],
                                                   reduction="none")
            if bar is not None:
                bar.update(logits.shape[0] * logits.shape[1])
    return losses


@torch.no_grad()
def control_losses(model, sequences, T, device, autocast, chunk=8192, bar=None):
    """The control: per-position loss (n, L) of sequences (n, L + 1) with the state reset to zero every T tokens,
    so every position is read with at most T tokens of context, exactly as in training. The sequences are cut into
    independent windows of T tokens (plus the next one as target), read as rows: chunk // T of them per pass, or
    one window in several pieces when T > chunk."""
    n, L = sequences.shape[0], sequences.shape[1] - 1
    padded = F.pad(sequences, (0, (-L) % T), value=0)  # whole windows; the padding's losses are dropped below
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


def measure_positions(checkpoints, reading):
    """Per checkpoint: the binned curve, its control and the summaries, as JSON-ready records."""
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
        records.append({"path": c.path, "label": c.label, "init": c.init, "T": c.T, "step": c.step,
                        "bins": {"start": [b[0] for b in bins], "end": [b[1] for b in bins], "loss": mean,
                                 "stderr": stderr, "control": control_mean},
                        "summary": summary(losses, c.T), "control_summary": summary(control, c.T)})
    return records


def plot_positions(records, path, reading):
    """Loss (or perplexity) against position: per model a line and its control (dotted); the training length
    dashed. Every model reads the same sequences, so their standard errors across sequences are alike (mostly how
    hard each text is): one band, the first model's, shows it without hiding the controls."""
    plt = _pyplot()
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
    ax.plot([], [], color="gray", linestyle="--", linewidth=1, label="training length T")
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
    print(summary_table(records, reading.args.len))
    return ["loss_vs_position.csv"]


def summary_table(records, length):
    """The summary means as aligned text: a row per model in the order given, a column per band."""
    names = [name for name, _, _ in SUMMARY_BANDS]
    header = ["model"] + [name.replace("len", str(length)) for name in names]
    rows = [[r["label"]] + [_cell(r["summary"][n], r["control_summary"][n]) for n in names] for r in records]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
                     for row in [header] + rows)


def _cell(value, control):
    return "-" if value is None else f"{value:.3f} ({control:.3f})"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    _pyplot().close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Effective Remembrance
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def next_token_distribution(model, tokens, device, autocast, chunk=8192, bar=None):
    """p(. | tokens) for tokens (n, L): the softmax after the last token, read from the zero state in pieces of at
    most chunk tokens.  (n, V)"""
    with autocast:
        for _, _, logits, _ in model.read(tokens.to(device), piece_length(chunk, len(tokens), model.cfg.vocab_size)):
            last = logits[:, -1].float()  # only the last position is needed; the rest is freed with its piece
            if bar is not None:
                bar.update(logits.shape[0] * logits.shape[1])
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


def effrem_T(args, checkpoints):
    """The one T every model's EffRem is measured at: --effrem_T, or 4 x the first model's training length."""
    return args.effrem_T or 4 * checkpoints[0].T


def measure_effrem(checkpoints, reading):
    T, args, n = effrem_T(reading.args, checkpoints), reading.args, len(reading.sequences)
    ts = sorted(set(np.linspace(0, T - 1, args.effrem_points).round().astype(int).tolist()))
    records = []
    for c in checkpoints:
        with progress(n * (T + sum(T - t for t in ts if t)), f"{c.label}: EffRem") as bar:
            values = effective_remembrance(c.model, reading.sequences, T, ts, reading.device, reading.autocast,
                                           args.chunk, bar)
        records.append({"path": c.path, "label": c.label, "train_T": c.T, "T": T, "t": ts, "effrem": values})
    return records


def plot_effrem(records, path, reading):
    plt = _pyplot()
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
    ax.set_ylabel(f"EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T])), T = {T}")
    ax.set_title(f"How much the prediction after T = {T} tokens depends on the first t\n{reading.description()}")
    _finish(fig, ax, path)


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
        for _, end, logits, state in model.read(tokens, piece_length(chunk, len(tokens), model.cfg.vocab_size),
                                                stops=positions):
            if bar is not None:
                bar.update(logits.shape[0] * logits.shape[1])
            if end in positions:
                for i, s in enumerate(state.ssm):
                    flat = s.float().flatten(1)  # (n, H * P * N)
                    norms[i].append(flat.norm(dim=1).mean().item())
                    stds[i].append(flat.std(dim=1).mean().item())
    return {"norm": norms, "std": stds}


def measure_state_stats(checkpoints, reading):
    n, L = reading.sequences.shape[0], reading.sequences.shape[1] - 1
    positions = np.unique(np.round(np.geomspace(1, L, 40)).astype(int)).tolist()
    records = []
    for c in checkpoints:
        with progress(n * L, f"{c.label}: state statistics") as bar:
            stats = state_statistics(c.model, reading.sequences, positions, reading.args.chunk, reading.device,
                                     reading.autocast, bar)
        records.append({"path": c.path, "label": c.label, "T": c.T, "positions": positions, **stats})
    return records


def plot_state_stats(records, path, reading, columns=6):
    """One panel per layer (at most `columns` per row), the models overlaid: the state's norm in one row of panels,
    its standard deviation in the row below."""
    plt = _pyplot()
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
            for i, r in enumerate(records):
                if layer < len(r[key]):
                    ax.plot(r["positions"], r[key][layer], color=f"C{i}", label=r["label"])
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


def measure_passkey(checkpoints, reading):
    args, tokenizer = reading.args, reading.corpus.tokenizer()
    records = []
    for c in checkpoints:
        total = sum(args.passkey_lengths) * len(args.passkey_depths) * args.passkey_trials
        with progress(total, f"{c.label}: passkey") as bar:
            accuracy = passkey_accuracy(c.model, tokenizer, args.passkey_lengths, args.passkey_depths,
                                        args.passkey_trials, reading.device, reading.autocast, args.chunk, bar=bar)
        records.append({"path": c.path, "label": c.label, "T": c.T, "lengths": args.passkey_lengths,
                        "depths": args.passkey_depths, "accuracy": accuracy})
    return records


def plot_passkey(records, path, reading):
    """A heatmap per model: accuracy per (prompt length, depth of the key), each cell labelled with its value."""
    plt = _pyplot()
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


# ----------------------------------------------------------------------------------------------------------------
# Copying (--task copy)
# ----------------------------------------------------------------------------------------------------------------

def copy_lengths(args, task):
    """--copy_lengths, or every length from 1 to 4 n_train: three times as far beyond the training strings as
    within them."""
    return args.copy_lengths or list(range(1, 4 * task.n_train + 1))


def measure_copy(checkpoints, reading):
    """Per checkpoint (one seed of a model), the character accuracy of copying the task's fixed evaluation strings
    at every length, greedy (through LM.step) and teacher-forced (tasks.copy_accuracy), each with its standard
    error over the strings."""
    task, args, device = reading.task, reading.args, reading.device
    lengths = copy_lengths(args, task)
    records = []
    for c in checkpoints:
        kinds = ("greedy", "greedy_stderr", "teacher_forced", "teacher_forced_stderr")
        record = {"path": c.path, "label": c.label, "model": c.name, "init": c.init, "T": c.T,
                  "n_train": task.n_train, "lengths": lengths, **{kind: [] for kind in kinds}}
        with progress(sum(args.copy_strings * (2 * n + 3) for n in lengths), f"{c.label}: copying") as bar:
            for n in lengths:  # one length at a time, for the bar
                with reading.autocast:
                    (greedy, stderr, forced), = copy_accuracy(c.model, task, [n], args.copy_strings,
                                                              device=device).values()
                    # copy_accuracy gives the mean only; the spread over strings costs one more parallel pass
                    per_string = teacher_forced_accuracy(c.model, task, task.eval_strings(n, args.copy_strings)
                                                         .to(device)).double()
                forced_stderr = per_string.std().item() / len(per_string) ** 0.5 if len(per_string) > 1 else 0.0
                for kind, value in zip(kinds, (greedy, stderr, forced, forced_stderr)):
                    record[kind].append(value)
                bar.update(args.copy_strings * (2 * n + 3))
        records.append(record)
    return records


def mean_and_std(per_seed):
    """Mean over seeds and the standard deviation across them (ddof = 1; 0 for a single seed).
    per_seed (seeds, ...) -> two arrays (...)"""
    per_seed = np.asarray(per_seed, dtype=float)
    return per_seed.mean(0), per_seed.std(0, ddof=1) if len(per_seed) > 1 else np.zeros(per_seed.shape[1:])


def copy_ranges(n_train):
    """The string lengths the summary averages over: within training, and up to 4 times beyond it."""
    return {"within": (1, n_train), "beyond": (n_train + 1, 4 * n_train)}


def range_summary(per_seed, lengths, lo, hi):
    """Each seed's mean accuracy over the lengths in [lo, hi], and the mean and std of those across seeds; None
    when no length falls there.  per_seed (seeds, len(lengths)), lengths (len(lengths),)"""
    inside = (lengths >= lo) & (lengths <= hi)
    if not inside.any():
        return None
    means = per_seed[:, inside].mean(1)  # (seeds,)
    mean, std = mean_and_std(means)
    return {"lengths": [lo, hi], "per_seed": means.tolist(), "mean": float(mean), "std": float(std)}


def copy_models(records):
    """The checkpoints' records grouped into models: checkpoints of one name (--label, or the run folder's name, as
    in out/copy/s0/zero, out/copy/s1/zero) are seeds of one model.  Per model, in the order first met, for greedy
    and teacher-forced copying: per length the mean over seeds, the standard deviation across seeds and the largest
    standard error over strings; per range of lengths (copy_ranges) each seed's mean over its lengths, and their
    mean and standard deviation across seeds (None where no length falls in the range)."""
    groups = {}
    for r in records:
        groups.setdefault(r["model"], []).append(r)
    models = []
    for name, seeds in groups.items():
        lengths, n_train = np.array(seeds[0]["lengths"]), seeds[0]["n_train"]
        model = {"label": name, "seeds": len(seeds), "checkpoints": [s["path"] for s in seeds],
                 "n_train": n_train, "lengths": lengths.tolist()}
        for kind in ("greedy", "teacher_forced"):
            per_seed = np.array([s[kind] for s in seeds])  # (seeds, lengths)
            mean, std = mean_and_std(per_seed)
            model[kind], model[f"{kind}_std"] = mean.tolist(), std.tolist()
            model[f"{kind}_stderr"] = np.max([s[f"{kind}_stderr"] for s in seeds], axis=0).tolist()
            for part, (lo, hi) in copy_ranges(n_train).items():
                model[f"{kind}_{part}"] = range_summary(per_seed, lengths, lo, hi)
        model["max_stderr"] = max(max(model["greedy_stderr"]), max(model["teacher_forced_stderr"]))
        models.append(model)
    return models


def plot_copy(records, path, reading):
    """Accuracy against string length, greedy (left) and teacher-forced (right): per model the mean over its seeds
    with a band of +- the standard deviation across them (a single seed: +- its standard error over strings);
    n_train dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    models = copy_models(records)
    for ax, kind, title in zip(axes, ("greedy", "teacher_forced"), ("greedy copy (through step)", "teacher-forced")):
        for i, m in enumerate(models):
            n, mean = np.array(m["lengths"]), np.array(m[kind])
            band = np.array(m[f"{kind}_std"] if m["seeds"] > 1 else m[f"{kind}_stderr"])
            seeds = f"{m['seeds']} seed" + "s" * (m["seeds"] > 1)
            ax.plot(n, mean, color=f"C{i}", marker=".", label=f"{m['label']} ({seeds})")
            ax.fill_between(n, mean - band, mean + band, color=f"C{i}", alpha=0.15, linewidth=0)
        ax.axvline(models[0]["n_train"], color="gray", linestyle="--", linewidth=1,
                   label="longest training string n_train")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("string length n")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("characters copied right (fraction)")
    fig.suptitle(f"Copying strings longer than any seen in training (bands: ± std across seeds; a single seed: "
                 f"± its standard error over strings)\n"
                 f"{reading.description()}", fontsize=10)
    _finish(fig, axes[0], path)


def plus_minus(entry):
    """'0.270 ± 0.030' for a range's summary over several seeds, '0.270' for one seed, '-' for no lengths."""
    if entry is None:
        return "-"
    return f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if len(entry["per_seed"]) > 1 else "")


def tabulate_copy(records, out, reading):
    """The per-model accuracies as CSV (a row per model and range of lengths, then per length), printed as two
    tables: the mean over seeds per length, and the summary per range, mean ± std across seeds.  A warning when a
    standard error over strings reaches 0.02.  Returns the file written."""
    models, n_train = copy_models(records), records[0]["n_train"]
    ranges = copy_ranges(n_train)
    with open(out / "copy_accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "seeds", "n_min", "n_max", "greedy", "greedy_std", "teacher_forced",
                         "teacher_forced_std", "max_stderr"])
        for m in models:
            for part, (lo, hi) in ranges.items():
                greedy, forced = m[f"greedy_{part}"], m[f"teacher_forced_{part}"]
                if greedy is not None:
                    writer.writerow([m["label"], m["seeds"], lo, hi, greedy["mean"], greedy["std"], forced["mean"],
                                     forced["std"], m["max_stderr"]])
            for i, n in enumerate(m["lengths"]):
                writer.writerow([m["label"], m["seeds"], n, n, m["greedy"][i], m["greedy_std"][i],
                                 m["teacher_forced"][i], m["teacher_forced_std"][i],
                                 max(m["greedy_stderr"][i], m["teacher_forced_stderr"][i])])
    rows = [[str(n)] + [f"{m['greedy'][i]:.3f} ({m['teacher_forced'][i]:.3f})" for m in models]
            for i, n in enumerate(models[0]["lengths"])]
    print(f"\ncopy accuracy, greedy (teacher-forced), mean over seeds; trained on n <= {n_train}")
    _print_table([["n"] + [m["label"] for m in models]] + rows)
    names = {"within": f"n <= {n_train}", "beyond": f"{n_train} < n <= {4 * n_train}"}
    header = ["model", "seeds"] + [f"{kind} {names[part]}" for kind in ("greedy", "teacher-forced") for part in ranges]
    rows = [[m["label"], str(m["seeds"])] + [plus_minus(m[f"{kind}_{part}"]) for kind in ("greedy", "teacher_forced")
                                             for part in ranges] + [f"{m['max_stderr']:.4f}"] for m in models]
    print("\ncopy accuracy, mean ± std across seeds (std of the per-seed means)")
    _print_table([header + ["max stderr"]] + rows)
    worst = max(models, key=lambda m: m["max_stderr"])
    if worst["max_stderr"] >= 0.02:
        print(f"warning: a standard error over strings of {worst['max_stderr']:.3f} ({worst['label']}) is not below "
              f"0.02: raise --copy_strings (now {reading.args.copy_strings})")
    return ["copy_accuracy.csv"]


def _print_table(rows):
    """Rows of strings printed in right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

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
    task: str = "lm"  # what the models must have been trained on: lm (text) or a task of tasks.py


DIAGNOSTICS = [
    Diagnostic("loss_vs_position", None, measure_positions, plot_positions, tabulate_positions),
    Diagnostic("effrem", "effrem", measure_effrem, plot_effrem),
    Diagnostic("state_stats", "state_stats", measure_state_stats, plot_state_stats),
    Diagnostic("passkey", "passkey", measure_passkey, plot_passkey),
    Diagnostic("copy_accuracy", None, measure_copy, plot_copy, tabulate_copy, copy_models, task="copy"),
]


def check_options(args):
    """One-line errors for impossible options, before anything is loaded or read."""
    for name in ("len", "num_seqs", "chunk", "bins", "passkey_trials", "effrem_points", "copy_strings"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name} must be at least 1")
    if args.effrem_T is not None and args.effrem_T < 2:
        raise EvalError("--effrem_T must be at least 2 (the context whose first t tokens are removed)")
    for name in ("passkey_lengths", "copy_lengths"):
        if min(getattr(args, name) or [1]) < 1:
            raise EvalError(f"--{name} must all be positive")
    if not all(0 <= d <= 1 for d in args.passkey_depths):
        raise EvalError("--passkey_depths must lie in [0, 1] (0: the key right after the intro, 1: right before "
                        "the question)")
    if args.train_len is not None and args.train_len < 1:
        raise EvalError("--train_len must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file: give a folder for the outputs")


def the_task(args, checkpoints):
    """What the models were trained on ("lm" or a task's name), the same for all and as --task says if given."""
    trained = dict.fromkeys(c.task for c in checkpoints)
    if len(trained) > 1:
        raise EvalError(f"these checkpoints were trained on different things ({', '.join(trained)}): evaluate them "
                        f"separately")
    task = next(iter(trained))
    if args.task not in (None, task):
        raise EvalError(f"--task {args.task}, but {checkpoints[0].label} was trained on {task}: give --task {task} "
                        f"or other checkpoints")
    return task


def prepare_text(reading):
    """The corpus and its evaluation sequences, refused in one line when a model cannot read them.  Returns what
    the outputs record about them."""
    args, checkpoints = reading.args, reading.checkpoints
    if args.effrem and effrem_T(args, checkpoints) > args.len:
        T = effrem_T(args, checkpoints)
        raise EvalError(f"EffRem with T={T} needs sequences of at least {T} tokens: raise --len or lower --effrem_T")
    foreign = next((c for c in checkpoints if c.pretrained or c.args.get("task", "lm") != "lm"), None)
    if foreign and not args.data:  # an official model, or one fine-tuned on a task of text, names no corpus
        raise EvalError(f"{foreign.label} was not trained on a corpus of this project: give --data, a corpus "
                        f"prepared with its tokenizer (python data.py --input ... --tokenizer "
                        f"{foreign.model.trained_on['tokenizer'] or '...'})")
    corpus = load_corpus(args.data or checkpoints[0].model.trained_on["corpus"] or "stdlib", args.data_dir)
    for c in checkpoints:
        mismatch = tokenizer_mismatch(corpus.meta, c.model.trained_on)
        if mismatch:
            raise EvalError(f"{c.label}: {mismatch}: give --data, a corpus prepared with the model's tokenizer")
        if corpus.vocab_size > c.model.cfg.vocab_size:
            raise EvalError(f"corpus '{corpus.name}' has {corpus.vocab_size} tokens but {c.label} knows only "
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
        tasks = [make_task(name, c.args) for c in reading.checkpoints]
    except ValueError as error:
        raise EvalError(f"--task {name}: {error}") from None
    settings = [vars(t) for t in tasks]
    if any(s != settings[0] for s in settings):
        raise EvalError(f"these checkpoints were trained on different {name} tasks: evaluate them separately")
    reading.task = tasks[0]
    return {"task": name, **{k: v for k, v in settings[0].items() if isinstance(v, (int, float, type(None)))}}


def run(args):
    check_options(args)
    device = pick_device(args.device)
    autocast, compute_dtype = autocast_for(device)
    checkpoints = load_all(find_checkpoints(args.ckpt, args.task), args.label, device, args.backend, args.train_len)
    for checkpoint in checkpoints:
        check_backend(checkpoint.model.cfg, device, compute_dtype)
    task = the_task(args, checkpoints)
    elsewhere = [f"--{d.flag}" for d in DIAGNOSTICS if d.flag and getattr(args, d.flag) and d.task != task]
    if elsewhere:
        raise EvalError(f"{', '.join(elsewhere)} measure language models; these checkpoints were trained on {task}")
    reading = Reading(args, device, autocast, checkpoints)
    record = prepare_text(reading) if task == "lm" else prepare_task(reading, task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # now: an unwritable folder fails before hours of reading
    written = []
    for d in DIAGNOSTICS:
        if d.task != task or (d.flag and not getattr(args, d.flag)):
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
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, DataError) as error:
        sys.exit(f"eval.py: error: {error}")
    except OSError as error:  # a full disk, a folder without write permission, ...
        where = f" ({error.filename})" if error.filename else ""
        sys.exit(f"eval.py: error: {error.strerror or error}{where}: check the path, its permissions and free space")


if __name__ == "__main__":
    main()
