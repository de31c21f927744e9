"""eval.py: how a recurrent LM behaves far beyond its training length T.

    python eval.py --len 131072                       every run under out/ (out/*/ckpt.pt, whoever made it: the
                                                      list is printed first), loss against token position
    python eval.py --len 131072 --ckpt out/zero --ckpt out/state_passing --effrem --state_stats
    python eval.py --passkey --ckpt state-spaces/mamba2-370m --data pile-neox --len 16384
                                                      an official Mamba-2 (pretrained/), passkey retrieval
    python eval.py --task copy                        copy accuracy of every run under out/copy/ (tasks/copy.py),
                                                      the runs of one name (out/copy/s0/zero, s1/zero, ...) as seeds
    python eval.py --task babilong --ckpt state-spaces/mamba2-370m --data RMT-team/babilong --len 16384
                                                      BABILong accuracy by task and length (tasks/babilong/)

The diagnostics of Buitrago Ruiz & Gu (arXiv 2507.02782), Section 3, each measured the same way for every model,
on the same text:
    loss against position (always): --num_seqs validation sequences of --len tokens, read from the zero state with
        the state handed on (each from a document start), the loss averaged over sequences in log-spaced bins. A
        narrow bin (short positions) also averages the first tokens of other documents, read only as far as it, so
        that every bin holds at least --bin_tokens tokens where the text has the documents (extra_lengths; its
        standard error is across the sequences it holds). Each model has a control: the same model and text with
        the state reset to zero every T tokens, so it never sees a position beyond T. The control moves with the
        text; a model that length-generalises stays at or below it, a failing one rises above it.
    --effrem       Effective Remembrance EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T])), TV = 1/2 sum |p - q|: how
                   much the prediction after T tokens still depends on the first t of them.
    --state_stats  norm and standard deviation of each layer's SSM state against position: states beyond T that
                   training never produced show up as norms that keep growing past the dashed line.
    --passkey      passkey retrieval (tasks/passkey.py); --task copy: copy accuracy against the string length
                   (tasks/copy.py, with --state_stats and --along_training); --task babilong: BABILong's accuracy
                   (tasks/babilong/evaluation.py).
Every forward pass reads at most --chunk tokens (rows x length), so memory stays flat as --len grows. Outputs in
--out (default eval/): NAME.png, NAME.json (the numbers) and for some a .csv, plus a printed table (plots/ draws
them). Models are named by their run folder (out/zero -> zero) or by --label, in the order given. Reading order:
the measurements, what each diagnostic records, loading the checkpoints and the text, the command line.
"""
if __name__ == "__main__":  # a Ctrl-C while the imports below load ends quietly, not with a traceback
    import signal
    import sys
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import torch
from tqdm import tqdm

import plots
import runs
from data import DATA_DIR, load_corpus, tokenizer_mismatch
from model import option
from runs import UsageError, piece_length


# ----------------------------------------------------------------------------------------------------------------
# Loss against position, and its control
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def position_losses(model, sequences, chunk, device, autocast, bar=None, rows=None):
    """Per-position loss (n, L) of sequences (n, L + 1) from the zero state, read in pieces of at most chunk tokens,
    at most rows rows a pass (default: all together). Each row carries a whole state (n_layer x H x P x N numbers
    for the SSM), so hundreds of short rows at once would take more memory than their tokens."""
    losses = torch.empty(sequences.shape[0], sequences.shape[1] - 1)
    rows = rows or len(sequences)
    for first in range(0, len(sequences), rows):
        part = sequences[first:first + rows]
        with autocast:
            losses[first:first + rows] = model.loss_per_position(
                part.to(device), piece_length(chunk, len(part), model.cfg.vocab_size), progress=bar)
    return losses


def control_rows(model, T, chunk):
    """Windows of T tokens the control reads a pass: chunk // T of them (one, in pieces, when T > chunk)."""
    return max(1, piece_length(chunk, 1, model.cfg.vocab_size) // T)


@torch.no_grad()
def control_losses(model, sequences, T, device, autocast, chunk=8192, bar=None):
    """The control: per-position loss (n, L) of sequences (n, L + 1) with the state reset to zero every T tokens,
    so every position is read with at most T tokens of context, exactly as in training: independent windows of T
    tokens (plus the next one as target) read as rows, control_rows of them a pass."""
    n, L = sequences.shape[0], sequences.shape[1] - 1
    padded = torch.nn.functional.pad(sequences, (0, (-L) % T), value=0)  # whole windows; the padding is dropped
    windows = padded.unfold(1, T + 1, T).flatten(0, 1)  # (n * L / T, T + 1), rows in sequence order
    losses = position_losses(model, windows, chunk, device, autocast, bar, rows=control_rows(model, T, chunk))
    return losses.reshape(n, -1)[:, :L]


def extra_lengths(bins, num_seqs, bin_tokens):
    """How far to read extra short sequences, longest first, so that every bin [start, end) averages at least
    bin_tokens tokens: ceil(bin_tokens / (end - start)) sequences reach its end, the num_seqs long ones among them.
    Narrow bins (short positions) need many sequences, but each costs only as many tokens as it is long."""
    needed = [-(-bin_tokens // (end - start)) - num_seqs for start, end in bins]
    return [max(end for (_, end), n in zip(bins, needed) if n > k) for k in range(max(needed + [0]))]


def log_bins(length, bins, first=8):
    """Position bins covering [0, length): [0, first), then up to bins - 1 log-spaced bins, none narrower than
    first positions (the first tokens of a document, headers and licences, are noisy one by one).  [(start, end)]"""
    first = min(first, length)
    edges = [0]
    for edge in np.round(np.geomspace(first, length, bins)).astype(int).tolist():
        if edge - edges[-1] >= first:
            edges.append(edge)
    edges[-1] = length  # a last edge closer than first to length widens the last bin
    return list(zip(edges[:-1], edges[1:]))


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
# What each diagnostic records (a JSON-ready record per checkpoint) and draws
# ----------------------------------------------------------------------------------------------------------------

def measure_positions(checkpoints, reading):
    """Loss and control against position, binned: each bin averages the long sequences and the short ones
    (reading.short) that reach its end; its standard error is across exactly those sequences. The table's summary
    bands are the long sequences' alone."""
    texts, args = [reading.sequences] + reading.short, reading.args
    bins = log_bins(reading.sequences.shape[1] - 1, args.bins)
    records = []
    for c in checkpoints:
        tokens = sum(len(s) * (s.shape[1] - 1 + -(-(s.shape[1] - 1) // c.T) * c.T) for s in texts)
        rows = control_rows(c.model, c.T, args.chunk)  # the many short sequences: no more rows a pass than these
        with reading.progress(tokens, f"{c.label}: loss and control") as bar:
            losses = [position_losses(c.model, s, args.chunk, reading.device, reading.autocast, bar, rows)
                      for s in texts]
            control = [control_losses(c.model, s, c.T, reading.device, reading.autocast, args.chunk, bar)
                       for s in texts]
        mean, stderr, count = plots.binned(losses, bins)
        control_mean, _, _ = plots.binned(control, bins)
        records.append({**c.record(), "bins": {"start": [b[0] for b in bins], "end": [b[1] for b in bins],
                                               "sequences": count, "loss": mean, "stderr": stderr,
                                               "control": control_mean},
                        "summary": plots.summary(losses[0], c.T), "control_summary": plots.summary(control[0], c.T)})
    return records


def measure_effrem(checkpoints, reading):
    T, args, n = effrem_T(reading.args, checkpoints), reading.args, len(reading.sequences)
    ts = sorted(set(np.linspace(0, T - 1, args.effrem_points).round().astype(int).tolist()))
    records = []
    for c in checkpoints:
        with reading.progress(n * (T + sum(T - t for t in ts if t)), f"{c.label}: EffRem") as bar:
            values = effective_remembrance(c.model, reading.sequences, T, ts, reading.device, reading.autocast,
                                           args.chunk, bar)
        records.append({**c.record(), "train_T": c.T, "T": T, "t": ts, "effrem": values})
    return records


def effrem_T(args, checkpoints):  # the one T of every model's EffRem: --effrem_T, or 4 x the first one's T
    return args.effrem_T or 4 * checkpoints[0].T


def measure_state_stats(checkpoints, reading):
    """The state along the evaluation text; for a copy task, along copy examples of strings 4 n_train long, with
    the largest norm reached along examples of the longest training strings (the range training saw)."""
    if reading.task is not None:  # the copy task: along its examples
        import tasks.copy

        return tasks.copy.measure_states(checkpoints, reading)
    n, L = reading.sequences.shape[0], reading.sequences.shape[1] - 1
    positions = np.unique(np.round(np.geomspace(1, L, 40)).astype(int)).tolist()
    records = []
    for c in checkpoints:
        with reading.progress(n * L, f"{c.label}: state statistics") as bar:
            stats = reading.state_statistics(c.model, reading.sequences, positions, bar)
        records.append({**c.record(), "positions": positions, **stats})
    return records


def diagnostics(task, args):
    """What to measure on models trained on task (lm or copy), each a dict: name (of the NAME.json and NAME.png
    written), measure (checkpoints, reading) -> a JSON-ready record per checkpoint, plot (records, path, reading),
    and optionally tabulate (records, out folder, reading) -> the extra files written, and summarise (records ->
    the JSON's "models"). The tasks' own come from tasks/, imported only when asked for. (A flag that asks for what
    these models cannot be read with was refused before: ONLY_FOR.)"""
    chosen = [dict(name="loss_vs_position", measure=measure_positions, plot=plots.positions,
                   tabulate=plots.tabulate_positions)] if task == "lm" else []
    if args.effrem:
        chosen.append(dict(name="effrem", measure=measure_effrem, plot=plots.effrem))
    if args.state_stats:
        chosen.append(dict(name="state_stats", measure=measure_state_stats, plot=plots.state_stats))
    if args.passkey:
        import tasks.passkey

        chosen.append(tasks.passkey.DIAGNOSTIC)
    if task == "copy":
        import tasks.copy

        chosen += [d for d in tasks.copy.DIAGNOSTICS if d["flag"] is None or getattr(args, d["flag"])]
    if task == "babilong":
        import tasks.babilong.evaluation

        chosen.append(tasks.babilong.evaluation.DIAGNOSTIC)
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Loading the checkpoints and the text they are read on
# ----------------------------------------------------------------------------------------------------------------

class Checkpoint:
    """A trained model with what the evaluation needs to know about it: its name, training length T, recipe.
    spec: a checkpoint of this project, or an official model (pretrained/)."""

    def __init__(self, spec, device, backend=None, label=None, train_len=None):
        self.folder, self.pretrained = Path(spec), not runs.is_checkpoint(spec)  # the folder or hub name naming it
        if self.pretrained:
            import pretrained

            self.model = pretrained.load_pretrained(spec, device, backend=backend)
            self.path, self.args, self.step = self.model.trained_on["source"], {}, None
        else:
            ckpt = runs.load_checkpoint(spec)
            self.model = runs.load_model(ckpt, device, backend=backend)
            self.path, self.args, self.step = str(runs.checkpoint_path(spec)), ckpt.get("args") or {}, ckpt.get("step")
            self.folder = Path(self.path).resolve().parent
        self.init, self.task = self.args.get("init"), self.args.get("task", "lm")
        self.task = "lm" if self.task in ("passkey", "babilong") else self.task  # fine-tuned in words: still an LM
        self.T = self.model.trained_on["seq_len"] or train_len
        if not self.T:
            raise runs.CheckpointError(f"{spec} does not record its training length: give it as --train_len T")
        # name: the model it is a run of (runs of one name are seeds); label: itself, told apart by load_all
        self.name = self.label = label or self.folder.name

    def record(self):
        """What every diagnostic's JSON says of this checkpoint."""
        return {"path": self.path, "label": self.label, "model": self.name, "init": self.init, "T": self.T,
                "step": self.step}


def runs_root(task=None):
    """Where eval.py looks for runs when no --ckpt is given: out/, or out/TASK/ for a task."""
    return Path("out", *([] if task in (None, "lm") else [task]))


def find_checkpoints(paths, task=None):
    """The --ckpt paths, or every run under out/ that has a checkpoint; for a task, under out/TASK/, also one level
    deeper (seeds: out/copy/s0/zero, out/copy/s1/zero, ...). Runs named zero (the baseline) first, then by name."""
    if paths:
        return paths
    root = runs_root(task)
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
    if train_len and all(c.model.trained_on["seq_len"] for c in checkpoints):
        raise UsageError("--train_len is for models that do not record their training length, and every one given "
                         "records it: drop it")
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
    short: list = None  # short sequences for the short positions, [(n, length + 1) int64] one tensor per length
    task: object = None  # a task of tasks/

    def progress(self, total, desc):  # a bar counting tokens read, left on screen when done
        return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)

    def checkpoint(self, spec, label=None, train_len=None):  # another one, a copy kept along training, say
        return Checkpoint(spec, self.device, label=label, train_len=train_len)

    def state_statistics(self, model, sequences, positions, bar=None):  # with the reading's chunk, device, autocast
        return state_statistics(model, sequences, positions, self.args.chunk, self.device, self.autocast, bar)


def document_prefixes(corpus, lengths, avoid):
    """The first lengths[k] + 1 tokens from a document start of the validation split (where eval_sequences start
    too, so that position t means t tokens into a document in both), the same on every call, none overlapping another
    or a range of avoid ([(start, end)]). Documents are tried in the order of their index x golden ratio (mod 1), so
    that the first few, however many, are spread over the split; as many as it has documents for.
    ([1-D int64 tensor], starts)"""
    tokens = corpus.tokens("val")
    starts = np.concatenate([[0], np.flatnonzero(tokens == corpus.meta["eot_token"]) + 1])  # after each end-of-text
    order = np.argsort((np.arange(len(starts)) * 0.6180339887498949) % 1.0, kind="stable")
    taken, spans = [], list(avoid)
    for start in starts[order].tolist():
        if len(taken) == len(lengths):
            break
        end = start + lengths[len(taken)] + 1
        if end <= len(tokens) and not any(start < e and b < end for b, e in spans):
            taken.append(start)
            spans.append((start, end))
    return [torch.from_numpy(tokens[s:s + n + 1].astype(np.int64)) for s, n in zip(taken, lengths)], taken


def the_task(args, checkpoints):
    """What the models were trained on ("lm" or a task's name), the same for all and as --task says if given."""
    trained = dict.fromkeys(c.task for c in checkpoints)
    if len(trained) > 1:
        raise UsageError(f"these checkpoints were trained on different things ({', '.join(trained)}): evaluate them "
                         f"separately")
    task = next(iter(trained))
    if args.task == "babilong" and task == "lm":  # any language model answers BABILong's questions
        return args.task
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
                         f"prepared with its tokenizer (python -m corpora --input ... --tokenizer "
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
    lengths = extra_lengths(log_bins(args.len, args.bins), args.num_seqs, args.bin_tokens)
    reach = max(lengths, default=0) + 1  # no bin holds the same text twice: short ones avoid the long ones' first part
    short, short_starts = document_prefixes(corpus, lengths, avoid=[(start, start + reach) for start in starts])
    reading.short = [torch.stack([s for s in short if len(s) == n]) for n in sorted({len(s) for s in short})]
    if len(short) < len(lengths):
        print(f"note: the short positions are also read on {len(short)} other documents' first tokens, not the "
              f"{len(lengths)} that --bin_tokens {args.bin_tokens} asks for (the validation split has no more): the "
              f"first bins average fewer tokens, and their standard errors say so")
    return {"corpus": corpus.name, "split": "val", "len": args.len, "num_seqs": args.num_seqs, "chunk": args.chunk,
            "sequence_starts": starts, "bin_tokens": args.bin_tokens,
            "short_sequences": {"lengths": [len(s) - 1 for s in short], "starts": short_starts}}


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """eval.py's options (model.option: default and help); the command line is generated from them."""
    ckpt: List[str] = option(None, "checkpoint file or run folder, or an official Mamba (hub name such as "
                                   "state-spaces/mamba2-370m, or a folder with config.json); repeat for several "
                                   "(default: every out/*/ckpt.pt, out/zero first; --task copy: out/copy/*, */*)")
    label: List[str] = option(None, "the name of each --ckpt in legends and tables (default: its run folder's); "
                                    "with --task copy, checkpoints of one name are seeds of one model")
    task: str = option(None, "lm: text from a corpus; copy: the copy task; babilong: BABILong (tasks/babilong/) "
                             "(default: what the checkpoints were trained on)", choices=("lm", "copy", "babilong"))
    train_len: int = option(None, "the training length T of models that do not record it")
    len: int = option(131072, "tokens per evaluation sequence")
    num_seqs: int = option(8, "evaluation sequences")
    chunk: int = option(2048, "tokens one forward pass reads, all rows together (fewer for large vocabularies); "
                              "more takes more memory, and on a CPU is no faster")
    out: str = option("eval", "output folder")
    data: str = option(None, "corpus to read (default: the one the first checkpoint was trained on); --task "
                             "babilong: its published sets, RMT-team/babilong or a folder (default: generated)")
    data_dir: str = option(str(DATA_DIR), "where corpora live")
    ppl: bool = option(None, "plot perplexity on a log axis (default: unless the corpus is byte tokens)")
    bins: int = option(48, "log-spaced bins of the curves")
    bin_tokens: int = option(4096, "tokens each bin averages at least, as far as the text has documents: short "
                                   "positions are also read on other documents' first tokens (0: none)")
    effrem: bool = option(False, "Effective Remembrance")
    effrem_T: int = option(None, "the T of EffRem_T (default: 4 x the first model's training length)")
    effrem_points: int = option(33, "values of t on the EffRem grid")
    state_stats: bool = option(False, "SSM state norm and std against position")
    passkey: bool = option(False, "passkey retrieval heatmap")
    passkey_lengths: List[int] = option(None, "prompt lengths in tokens (default, the paper's: 2048 ... 262144)")
    passkey_depths: List[float] = option(None, "relative depths of the key in [0, 1] (default: 0.1 0.5 0.9)")
    passkey_trials: int = option(4, "random keys per (length, depth) cell")
    passkey_filler: str = option("repeated", "the paper's repeated line, or varied: natural sentences",
                                 choices=("repeated", "varied"))
    copy_lengths: List[int] = option(None, "string lengths to copy (default: every length from 1 to 4 n_train)")
    copy_strings: int = option(256, "strings per length (256: a standard error of at most 0.031 per length)")
    along_training: bool = option(False, "copy: accuracy against training step, from a run's ckpt_STEP.pt files")
    depth: str = option("any", "babilong, generated: where the facts go: anywhere; early, in the first --span tokens "
                               "(memory); late, in the last --span tokens (robustness)",
                        choices=("any", "early", "late"))
    span: int = option(None, "babilong: tokens of the context that hold the facts with --depth early or late "
                             "(default: half the first model's T)")
    device: str = option("auto", "cpu, cuda, ... (default: cuda when available)")
    backend: str = option(None, "scan implementation (default: auto)", choices=("auto", "torch", "triton"))
    given: dict = None  # not a flag: the flags given, checked again (ONLY_FOR) once the task is known


RULES = [  # the values each option may take (runs.check)
    (("ckpt", "label", "out", "data", "data_dir"), "a non-empty string", lambda x: x.strip() != ""),
    (("train_len", "len", "num_seqs", "chunk", "bins", "effrem_points", "passkey_lengths", "passkey_trials",
      "copy_lengths", "copy_strings", "span"), "at least 1", lambda x: x >= 1),
    (("bin_tokens",), "at least 0", lambda x: x >= 0),
    (("bin_tokens",), "at most 1,048,576", lambda x: x <= 2 ** 20),
    (("len", "effrem_T"), "at most 16,777,216", lambda x: x <= 2 ** 24),
    (("num_seqs", "bins", "effrem_points", "copy_lengths", "copy_strings"), "at most 4,096", lambda x: x <= 4096),
    (("chunk", "passkey_lengths"), "at most 4,194,304", lambda x: x <= 2 ** 22),
    (("passkey_trials",), "at most 10,000", lambda x: x <= 10000),
    (("effrem_T",), "at least 2", lambda x: x >= 2),
    (("passkey_depths",), "in [0, 1]", lambda x: 0 <= x <= 1),
]


# Options that mean something for one task or with one diagnostic only: given anywhere else, they are refused
# (runs.check), the task's once the checkpoints say what they were trained on.
ONLY_FOR = {**dict.fromkeys(("bins", "bin_tokens", "ppl", "effrem", "passkey"), ("task", ("lm",))),
            **dict.fromkeys(("len", "num_seqs", "data", "data_dir"), ("task", ("lm", "babilong"))),
            **dict.fromkeys(("depth", "span"), ("task", ("babilong",))),
            **dict.fromkeys(("copy_lengths", "copy_strings", "along_training"), ("task", ("copy",))),
            **dict.fromkeys(("effrem_T", "effrem_points"), ("effrem", (True,))),
            **dict.fromkeys(("passkey_lengths", "passkey_depths", "passkey_trials", "passkey_filler"),
                            ("passkey", (True,)))}


def setting(args, task=None):
    """What ONLY_FOR's options depend on: the diagnostics asked for, and the task once known."""
    return {"effrem": args.effrem, "passkey": args.passkey, **({"task": task} if task else {})}


def parse(argv):
    """The options: the flags given, EvalConfig's defaults for the rest, each checked."""
    given = runs.parse("eval.py", __doc__, argv, {"evaluation (EvalConfig)": EvalConfig})
    args = EvalConfig(**given, given=given)
    runs.check(given, RULES, ONLY_FOR, setting(args, args.task))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file: give a folder for the outputs")
    return args


def evaluate(args):
    device = runs.pick_device(args.device)
    autocast, compute_dtype = runs.autocast_for(device)
    checkpoints = load_all(find_checkpoints(args.ckpt, args.task), args.label, device, args.backend, args.train_len)
    for checkpoint in checkpoints:  # --backend triton, or a checkpoint trained with it
        if checkpoint.model.cfg.backend == "triton":
            runs.check_backend(checkpoint.model.cfg, device, compute_dtype)
    task = the_task(args, checkpoints)
    runs.check(args.given or {}, [], ONLY_FOR, setting(args, task))
    plots.tabulate_checkpoints(checkpoints, f"reading the {len(checkpoints)} checkpoint(s) given" if args.ckpt
                               else f"no --ckpt: reading every run under {runs_root(task)}/ (--ckpt chooses)")
    chosen = diagnostics(task, args)
    reading = Reading(args, device, autocast, checkpoints)
    if task == "lm":
        record = prepare_text(reading)
    elif task == "babilong":
        import tasks.babilong.evaluation

        record = tasks.babilong.evaluation.prepare(reading)
    else:
        import tasks.copy

        record = tasks.copy.prepare(reading)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # now: an unwritable folder fails before hours of reading
    written = []
    for d in chosen:
        records = d["measure"](checkpoints, reading)
        models = {"models": d["summarise"](records)} if d.get("summarise") else {}
        runs.write_atomically(out / f"{d['name']}.json", json.dumps({**record, "checkpoints": records, **models},
                                                                    indent=1) + "\n")  # the numbers first
        d["plot"](records, out / f"{d['name']}.png", reading)
        written += [f"{d['name']}.png", f"{d['name']}.json"] + (d["tabulate"](records, out, reading)
                                                                if d.get("tabulate") else [])
    print("\nwrote " + ", ".join(str(out / name) for name in written))
    return out


def main(argv=None):
    return runs.one_line("eval.py", lambda argv: evaluate(parse(argv)), argv)


if __name__ == "__main__":
    main()
