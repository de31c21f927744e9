"""tasks/babilong/evaluation.py: eval.py --task babilong, BABILong accuracy by task and length, per model.

    python eval.py --task babilong --ckpt state-spaces/mamba2-370m --data RMT-team/babilong --len 16384 --num_seqs 100
    python eval.py --task babilong --ckpt out/base --ckpt out/babilong/zero --len 65536

Every model answers the same samples of qa1 and qa2 at every length up to --len (--num_seqs of each): with --data,
the published sets (a hub dataset such as RMT-team/babilong, or a folder in its layout) at the lengths "0k", "1k",
"2k", ... of the benchmark; without, samples generated in the models' tokenizer with contexts of 0 tokens (the
facts alone) and of every power of two from the shortest that holds a story. A model reads its prompt once, in
pieces of at most --chunk tokens, so memory does not grow with the length, and answers with ANSWER_TOKENS greedy
tokens through its recurrent step. A model fine-tuned on BABILong (train.py --task babilong) reads the prompt it was
trained with; any other language model reads the benchmark's few-shot prompt. Outputs: babilong.json (accuracy,
and every answer), babilong.png (accuracy against length, one line per model, its training length T marked) and a
table in the paper's form, printed and in babilong.csv.
"""
import csv

import numpy as np
import torch

from runs import UsageError, print_table, pyplot
from tasks.babilong.babi import TASKS
from tasks.babilong.dataset import LENGTH_NAMES, generated_set, length_tokens, read_set, shortest_length
from tasks.babilong.prompts import ANSWER_TOKENS, is_correct
from tasks.babilong.task import prompt_tokens
from tasks.passkey import greedy_answers


class Samples:
    """What every model answers: sets[(task, length)], a list of samples; lengths, their names (published) or
    context tokens (generated), and tokens, their lengths in tokens, for the plot's axis."""

    def __init__(self, tokenizer, source, sets, lengths, tokens, tasks=TASKS):
        self.tokenizer, self.source, self.sets, self.lengths, self.tokens = tokenizer, source, sets, lengths, tokens
        self.tasks = tasks  # the bAbI tasks asked
        self.where = ""  # where the facts are, when not anywhere: for the plot's title
        self.description = f"BABILong {', '.join(tasks)}, " + (f"{source}" if source else "generated samples")

    def tokens_read(self, few_shot):
        """About how many tokens a model reads (each set's first prompt times its samples), for a progress bar."""
        return sum(len(prompt_tokens(self.tokenizer, task, sets[0]["input"], sets[0]["question"], few_shot)) *
                   len(sets) for (task, _), sets in self.sets.items())


def prepare(reading):
    """The samples, as reading.task, in the tokenizer the models share. Returns what the outputs record."""
    from corpora.tokenizer import get_tokenizer

    args, first = reading.args, reading.checkpoints[0]
    if args.state_stats:
        raise UsageError("--state_stats reads text or copy examples, not BABILong's: measure it without --task "
                         "babilong")
    spec = first.model.trained_on["tokenizer"]
    if spec is None:
        raise UsageError(f"{first.label} does not say which tokenizer it was trained with, so it cannot read "
                         f"BABILong's text: give a model trained on a prepared corpus, or an official one")
    tokenizer = get_tokenizer(spec)
    trained = first.args if first.args.get("task") == "babilong" else {}  # stories as the first model learnt them
    tasks, facts = tuple(trained.get("babilong_tasks") or TASKS), trained.get("babilong_facts")
    depth, span = args.depth or "any", args.span or first.T // 2
    if args.data:
        if depth != "any":
            raise UsageError(f"--depth {args.depth} places the facts of generated samples; the published sets have "
                             f"theirs anywhere: drop --data or --depth")
        lengths = [name for name in LENGTH_NAMES if length_tokens(name) <= args.len]
        tokens = [length_tokens(name) for name in lengths]
        sets = {(task, name): read_set(args.data, task, name)[:args.num_seqs] for task in tasks for name in lengths}
    else:
        shortest = max(shortest_length(task, tokenizer, facts) for task in tasks)
        lengths = [0] + [2 ** k for k in range(40) if shortest <= 2 ** k <= args.len]
        tokens = lengths
        sets = {(task, n): generated_set(task, n, args.num_seqs, tokenizer, facts=facts, depth=depth, span=span)
                for task in tasks for n in lengths}
    reading.task = Samples(tokenizer, args.data, sets, lengths, tokens, tasks)
    if depth != "any":
        reading.task.where = f", facts in the {'first' if depth == 'early' else 'last'} {span} tokens"
    return {"task": "babilong", "source": args.data or "generated", "tasks": list(tasks), "lengths": lengths,
            "samples": args.num_seqs, "chunk": args.chunk, "facts": facts, "depth": depth,
            "span": None if depth == "any" else span}


@torch.no_grad()  # no graph: the state handed from piece to piece would keep every piece's activations alive
def answers(model, prompts, reading, bar):
    """Greedy answers (lists of ids) to prompts (lists of ids), those of equal length read together."""
    found = [None] * len(prompts)
    for size in sorted({len(p) for p in prompts}):
        group = [i for i, p in enumerate(prompts) if len(p) == size]
        for i, ids in zip(group, greedy_answers(model, [prompts[i] for i in group], ANSWER_TOKENS, reading.autocast,
                                                reading.args.chunk)):
            found[i] = ids
        bar.update(size * len(group))
    return found


def decode(tokenizer, ids):
    """An answer's text: up to its first end-of-text token, stripped, as BABILong reads it."""
    eot = getattr(tokenizer, "eot_token", None)
    return tokenizer.decode(ids[:ids.index(eot)] if eot in ids else ids).strip()


def measure(checkpoints, reading):
    samples = reading.task
    records = []
    for c in checkpoints:
        few_shot = c.args.get("task") != "babilong"  # a model fine-tuned on it reads the prompt it learnt
        record = {**c.record(), "prompt": "few-shot" if few_shot else "fine-tuned", "lengths": samples.lengths,
                  "tokens": samples.tokens, "accuracy": {}, "answers": {}}
        with reading.progress(samples.tokens_read(few_shot), f"{c.label}: BABILong") as bar:
            for task in samples.tasks:
                record["accuracy"][task], record["answers"][task] = [], []
                for length in samples.lengths:
                    sets = samples.sets[task, length]
                    prompts = [prompt_tokens(samples.tokenizer, task, s["input"], s["question"], few_shot)
                               for s in sets]  # one length at a time: long prompts take much memory as lists
                    said = [decode(samples.tokenizer, ids) for ids in answers(c.model, prompts, reading, bar)]
                    right = [is_correct(task, a, s["target"], s["question"]) for a, s in zip(said, sets)]
                    record["accuracy"][task].append(float(np.mean(right)))
                    record["answers"][task].append(said)
        record["mean"] = np.mean([record["accuracy"][task] for task in samples.tasks], axis=0).tolist()
        records.append(record)
    return records


def axis_positions(tokens):
    """Where each length goes on the plot's axis: evenly spaced, as the paper's columns.  Returns a function
    from tokens to a position (lengths between two columns placed by their logarithm)."""
    known = np.log2(np.maximum(tokens, 1).astype(float))
    return lambda t: float(np.interp(np.log2(max(t, 1)), known, np.arange(len(tokens)),
                                     left=-0.5, right=len(tokens) - 0.5))


def plot(records, path, reading):
    """Accuracy against length, the mean over the tasks per model (each task dotted), T dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    samples = reading.task
    where = axis_positions(np.array(samples.tokens))
    x = np.arange(len(samples.lengths))
    for i, r in enumerate(records):
        ax.plot(x, r["mean"], color=f"C{i}", marker="o", linewidth=1.8, label=f"{r['label']} ({r['prompt']})")
        for task, style in zip(samples.tasks if len(samples.tasks) > 1 else (), (":", "-.")):
            ax.plot(x, r["accuracy"][task], color=f"C{i}", linestyle=style, linewidth=0.9, alpha=0.7)
        ax.axvline(where(r["T"]), color=f"C{i}", linestyle="--", linewidth=1)
    for task, style in zip(samples.tasks if len(samples.tasks) > 1 else (), (":", "-.")):
        ax.plot([], [], color="gray", linestyle=style, linewidth=0.9, label=task)
    ax.plot([], [], color="gray", linestyle="--", linewidth=1, label="training length T")
    ax.set_xticks(x, [str(n) for n in samples.lengths])
    ax.set_xlabel("length (" + ("the benchmark's, thousands of tokens" if samples.source else
                                "context tokens") + ")")
    ax.set_ylabel(f"accuracy (mean of {', '.join(samples.tasks)})")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"BABILong: is the answer right?\n{samples.description}, "
                 f"{len(next(iter(samples.sets.values())))} samples per task and length{samples.where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def tabulate(records, out, reading):
    """The paper's table: a row per model (and per task), a column per length."""
    lengths = [str(n) for n in reading.task.lengths]
    rows = [[r["label"], r["prompt"], "mean"] + [f"{a:.2f}" for a in r["mean"]] for r in records]
    rows += [[r["label"], r["prompt"], task] + [f"{a:.2f}" for a in r["accuracy"][task]] for r in records
             for task in reading.task.tasks]
    print_table([["model", "prompt", "task"] + lengths] + rows, left=3, title="BABILong accuracy", rule=True)
    with open(out / "babilong.csv", "w", newline="") as f:
        csv.writer(f).writerows([["model", "prompt", "task"] + lengths] + rows)
    return ["babilong.csv"]


DIAGNOSTIC = dict(name="babilong", measure=measure, plot=plot, tabulate=tabulate)  # an entry of eval.diagnostics
