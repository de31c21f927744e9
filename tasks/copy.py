"""tasks/copy.py: the synthetic copying task, its scoring, and its evaluation (eval.py --task copy).

Jelassi et al. 2024, "Repeat After Me: Transformers are Better than State Space Models at Copying" (arXiv 2402.01032),
the task the paper uses for its one small-scale experiment: read a random string, then write it again.
    start s_1 .. s_n copy s_1 .. s_n end   (2n + 3 tokens)
A recurrent model must hold the whole string in its fixed-size state; trained on n <= n_train, it is asked to copy
strings several times longer, scored by the fraction of characters right. Right or wrong at every length, where
language-model loss shows length generalisation only on average.

    task = CopyTask(alphabet_size=10, n_train=16)        one example per row (context=0), the experiment's layout
    inputs, targets = task.batch(batch_size, generator)  (B, 2n + 3) each, targets -1 where the loss does not count
    copy_accuracy(model, task, lengths, strings_per_length) -> {n: (greedy, its stderr, teacher-forced, its stderr)}

The file reads: the task, scoring copies, reporting accuracy (seeds of one model grouped, tables, figures), and what
eval.py --task copy measures and writes (DIAGNOSTICS), so that the experiment lives in one place.
"""
import csv

import numpy as np
import torch

import plots
from runs import UsageError, print_table, pyplot


class CopyTask:
    """Copy a random string over an alphabet of alphabet_size characters (token ids 0 .. A - 1); the special
    tokens start, copy and end follow (ids A, A + 1, A + 2). Training strings have a length drawn uniformly from
    [1, n_train]. Nothing is padded, in either of two batch layouts:

    context=0     one example per row, one string length per batch: the experiment's layout. Every row of a
                  zero-init batch reads its example from the true zero state, which is the model the paper
                  repairs: one that has only ever started from zero. The row ends exactly at the example's end
                  token, so the State after a batch is the state right after a whole example: state passing hands
                  the next batch what a model reading examples back to back would carry. (Padding before an example
                  would move its start state.) The price: a batch's examples share one length; over many batches
                  the lengths are uniform in [1, n_train].
    context=C     the original task's layout: rows of exactly C tokens packed with examples back to back, lengths
                  drawn per example; the example cut by the row's end has no targets. Only a row's first example
                  starts from the zero state: a zero-init model then already reads most of its examples from states
                  left by earlier ones, a form of state passing, so it is no clean baseline for the interventions.
    """

    name = "copy"
    needs_tokenizer = False

    def __init__(self, alphabet_size, n_train, context=0):
        if alphabet_size < 2 or n_train < 1:
            raise ValueError(f"the copy task needs alphabet_size >= 2 and n_train >= 1; got {alphabet_size}, "
                             f"{n_train}")
        if context and context < 2 * n_train + 3:
            raise ValueError(f"a context of {context} tokens cannot hold the longest example ({2 * n_train + 3} "
                             f"tokens): raise context or lower n_train")
        self.alphabet_size, self.n_train, self.context = alphabet_size, n_train, context or 0
        self.start, self.copy, self.end = alphabet_size, alphabet_size + 1, alphabet_size + 2

    @property
    def vocab_size(self):
        return self.alphabet_size + 3

    @property
    def train_tokens(self):
        """The training length T in model positions: the longest training example, or the packed row."""
        return self.context or 2 * self.n_train + 3

    def strings(self, length, count, generator):
        """count random strings of the given length.  Returns (count, length) int64."""
        return torch.randint(0, self.alphabet_size, (count, length), generator=generator)

    def eval_strings(self, length, count, seed=0):
        """The fixed evaluation strings of one length: the same for every model, run and evaluation length list."""
        return self.strings(length, count, torch.Generator().manual_seed(seed * 1_000_003 + length))

    def prompts(self, strings):
        """start s copy: what a model reads before it copies.  strings (B, n) -> (B, n + 2)."""
        B = strings.shape[0]
        return torch.cat([strings.new_full((B, 1), self.start), strings, strings.new_full((B, 1), self.copy)], 1)

    def sequences(self, strings):
        """Whole examples, start s copy s end.  strings (B, n) -> (B, 2n + 3)."""
        return torch.cat([self.prompts(strings), strings, strings.new_full((strings.shape[0], 1), self.end)], 1)

    def inputs_and_targets(self, strings):
        """(inputs, targets), each (B, 2n + 3) int64. inputs is the whole example, end token included, so a model's
        final State is the state after the example. targets[:, t] is the token after inputs[:, t] where the loss
        counts, -1 elsewhere: it counts the n copied characters and the end token (predicted at positions n + 1 ..
        2n + 1). The end token counts because greedy copying must know when to stop; the first half (random) and
        the copy token (whose place depends on the random length) cannot be predicted and do not count."""
        inputs = self.sequences(strings)
        n = strings.shape[1]
        targets = torch.full_like(inputs, -1)
        targets[:, n + 1:2 * n + 2] = inputs[:, n + 2:]
        return inputs, targets

    def batch(self, batch_size, generator):
        """A training batch in the task's layout: batch_size examples of one random length n, or batch_size packed
        rows. Returns (inputs, targets), each (B, 2n + 3) or (B, context) int64 on the CPU."""
        if not self.context:
            return self.inputs_and_targets(self.strings(self.random_length(generator), batch_size, generator))
        rows = [self.packed_row(generator) for _ in range(batch_size)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def random_length(self, generator):
        """A training string length, uniform in [1, n_train]."""
        return int(torch.randint(1, self.n_train + 1, (1,), generator=generator))

    def packed_row(self, generator):
        """(inputs, targets), each (context,): examples back to back; the one the row cuts has its targets at -1."""
        inputs, targets, filled = [], [], 0
        while filled < self.context:
            example, example_targets = self.inputs_and_targets(self.strings(self.random_length(generator), 1,
                                                                            generator))
            filled += example.shape[1]
            inputs.append(example[0])
            targets.append(example_targets[0] if filled <= self.context else torch.full_like(example[0], -1))
        return torch.cat(inputs)[:self.context], torch.cat(targets)[:self.context]

    def answer(self, generated):
        """The copy a model wrote: generated tokens (a list of ids) up to, not including, the first end token."""
        return generated[:generated.index(self.end)] if self.end in generated else generated


# ----------------------------------------------------------------------------------------------------------------
# Scoring copies: the definitions, then the fast path eval.py uses
# ----------------------------------------------------------------------------------------------------------------

def char_accuracy(predicted, true):
    """Fraction of the true string's characters that the prediction has at the same position, where a prediction
    longer than the string is scored over its own length: missing and extra characters both count as wrong.
    predicted, true: lists of token ids (true non-empty).  Returns a float in [0, 1]."""
    right = sum(p == t for p, t in zip(predicted, true))
    return right / max(len(predicted), len(true))


@torch.no_grad()
def greedy_copies(model, task, strings):
    """The copies a model writes by greedy decoding through LM.step after reading each prompt from the zero state.
    At most n + 1 tokens are generated (room for the copy and its end token), so a copy that does not stop loses
    one extra position. strings (B, n) -> list of B lists of token ids."""
    logits, _, state = model(task.prompts(strings))
    return [task.answer(row) for row in model.greedy(logits[:, -1], state, strings.shape[1] + 1).tolist()]


@torch.no_grad()
def teacher_forced_accuracy(model, task, strings):
    """Per string, the fraction of copied characters whose argmax prediction is right given the true prefix (the
    whole example read from the zero state).  strings (B, n) -> (B,) float."""
    n = strings.shape[1]
    logits, _, _ = model(task.sequences(strings))
    predicted = logits[:, n + 1:2 * n + 1].argmax(-1)  # (B, n): the positions that predict the copied characters
    return (predicted == strings).float().mean(1)


@torch.no_grad()
def copy_scores(model, task, strings):
    """Greedy and teacher-forced accuracy per string, (B,) float64 each, for strings (B, n): greedy_copies and
    teacher_forced_accuracy in one reading. Each whole example is read once, in two pieces: the prompt, whose State
    greedy decoding continues from, then the copy, whose predictions given the true prefix are the teacher-forced
    ones. A length's strings decode together, one step() per character for the whole batch."""
    n = strings.shape[1]
    prompt_logits, _, state = model(task.prompts(strings))  # start s copy
    copy_logits, _, _ = model(task.sequences(strings)[:, n + 2:], state=state)  # s end, from where it stopped
    predicted = torch.cat([prompt_logits[:, -1:], copy_logits[:, :n - 1]], 1).argmax(-1)  # (B, n)
    forced = (predicted == strings).double().mean(1)
    copies = [task.answer(row) for row in model.greedy(prompt_logits[:, -1], state, n + 1).tolist()]
    greedy = torch.tensor([char_accuracy(c, s) for c, s in zip(copies, strings.tolist())], dtype=torch.float64)
    return greedy, forced


def copy_accuracy(model, task, lengths, strings_per_length=32, seed=0, device="cpu"):
    """Character accuracy of copying the fixed evaluation strings (task.eval_strings) of every length.

    Returns {n: (greedy mean, its standard error over strings, teacher-forced mean, its standard error)}. Greedy is
    what a user of the model sees: one wrong or missing character can derail the rest. Teacher-forced (the argmax
    at each copy position given the true prefix) is how the original task's code scores; it only asks whether the
    string is still in the state. The model is put in eval mode and restored after."""
    was_training = model.training
    model.eval()
    results = {}
    for n in lengths:
        greedy, forced = copy_scores(model, task, task.eval_strings(n, strings_per_length, seed).to(device))
        results[n] = (greedy.mean().item(), _stderr(greedy), forced.mean().item(), _stderr(forced))
    model.train(was_training)
    return results


def _stderr(values):
    return values.std().item() / len(values) ** 0.5 if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Reporting copy accuracy: seeds of one model grouped, tables, figures
# ----------------------------------------------------------------------------------------------------------------

def copy_ranges(n_train):
    """The string lengths the summary averages over: within training, and up to 4 times beyond it."""
    return {"within": (1, n_train), "beyond": (n_train + 1, 4 * n_train)}


def mean_and_std(per_seed):
    """Mean over seeds and the standard deviation across them (ddof = 1; 0 for a single seed).
    per_seed (seeds, ...) -> two arrays (...)"""
    per_seed = np.asarray(per_seed, dtype=float)
    return per_seed.mean(0), per_seed.std(0, ddof=1) if len(per_seed) > 1 else np.zeros(per_seed.shape[1:])


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
    """The checkpoints' records grouped into models: records of one "model" name (--label, or the run folder's
    name, as in out/copy/s0/zero, out/copy/s1/zero) are seeds of one model.  Per model, in the order first met, for
    greedy and teacher-forced copying: per length the mean over seeds, the standard deviation across seeds and the
    largest standard error over strings; per range of lengths (copy_ranges) each seed's mean over its lengths, and
    their mean and standard deviation across seeds (None where no length falls in the range)."""
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


def plot_copy(models, path, title):
    """Accuracy against string length, greedy (left) and teacher-forced (right): per model the mean over its seeds
    with a band of +- the standard deviation across them (a single seed: +- its standard error over strings);
    n_train dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, kind, name in zip(axes, ("greedy", "teacher_forced"), ("greedy copy (through step)", "teacher-forced")):
        for i, m in enumerate(models):
            n, mean = np.array(m["lengths"]), np.array(m[kind])
            band = np.array(m[f"{kind}_std"] if m["seeds"] > 1 else m[f"{kind}_stderr"])
            ax.plot(n, mean, color=f"C{i}", marker=".", label=f"{m['label']} ({m['seeds']} seed"
                                                              f"{'s' * (m['seeds'] > 1)})")
            ax.fill_between(n, mean - band, mean + band, color=f"C{i}", alpha=0.15, linewidth=0)
        ax.axvline(models[0]["n_train"], color="gray", linestyle="--", linewidth=1,
                   label="longest training string n_train")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("string length n")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("characters copied right (fraction)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Copying strings longer than any seen in training (bands: ± std across seeds; a single seed: "
                 f"± its standard error over strings)\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plus_minus(entry):
    """'0.270 ± 0.030' for a range's summary over several seeds, '0.270' for one seed, '-' for no lengths."""
    if entry is None:
        return "-"
    return f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if len(entry["per_seed"]) > 1 else "")


def tabulate_copy(models, csv_path, strings):
    """The per-model accuracies as CSV (a row per model and range of lengths, then per length), printed as two
    tables: the mean over seeds per length, and the summary per range, mean ± std across seeds.  A warning when a
    standard error over strings reaches 0.02 (strings: the --copy_strings that gave it)."""
    n_train = models[0]["n_train"]
    ranges = copy_ranges(n_train)
    with open(csv_path, "w", newline="") as f:
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
    print_table([["n"] + [m["label"] for m in models]] + rows)
    names = {"within": f"n <= {n_train}", "beyond": f"{n_train} < n <= {4 * n_train}"}
    header = ["model", "seeds"] + [f"{kind} {names[part]}" for kind in ("greedy", "teacher-forced") for part in ranges]
    rows = [[m["label"], str(m["seeds"])] + [plus_minus(m[f"{kind}_{part}"]) for kind in ("greedy", "teacher_forced")
                                             for part in ranges] + [f"{m['max_stderr']:.4f}"] for m in models]
    print("\ncopy accuracy, mean ± std across seeds (std of the per-seed means)")
    print_table([header + ["max stderr"]] + rows)
    worst = max(models, key=lambda m: m["max_stderr"])
    if worst["max_stderr"] >= 0.02:
        print(f"warning: a standard error over strings of {worst['max_stderr']:.3f} ({worst['label']}) is not below "
              f"0.02: raise --copy_strings (now {strings})")


def along_training(records):
    """Accuracy beyond the training lengths against training step, per model: records are copy-accuracy records
    of checkpoints saved along training (a "step" each); those of one model and step are its seeds.
    Returns [{label, steps, greedy/teacher_forced beyond: mean and std across seeds per step, seeds}]."""
    groups = {}
    for r in records:
        groups.setdefault(r["model"], {}).setdefault(r["step"], []).append(r)
    models = []
    for name, by_step in groups.items():
        steps = sorted(by_step)
        model = {"label": name, "steps": steps, "seeds": [len(by_step[s]) for s in steps]}
        for kind in ("greedy", "teacher_forced"):
            for part in ("within", "beyond"):
                summaries = [copy_models(by_step[s])[0][f"{kind}_{part}"] for s in steps]
                model[f"{kind}_{part}"] = [x and x["mean"] for x in summaries]
                model[f"{kind}_{part}_std"] = [x and x["std"] for x in summaries]
        models.append(model)
    return models


def plot_along_training(models, path, title):
    """Greedy accuracy within (dotted) and beyond (solid) the training lengths against training step, a band of
    +- the std across seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, m in enumerate(models):
        steps = np.array(m["steps"])
        for part, style in (("beyond", "-"), ("within", ":")):
            mean = np.array(m[f"greedy_{part}"], dtype=float)
            std = np.array(m[f"greedy_{part}_std"], dtype=float)
            ax.plot(steps, mean, color=f"C{i}", linestyle=style, marker=".",
                    label=f"{m['label']}, {part} n_train (seeds: {max(m['seeds'])})")
            ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.12, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("greedy copy accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Copy accuracy along training (bands: ± std across seeds)\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# eval.py --task copy: what it measures for each checkpoint, draws and prints (entries of eval.diagnostics)
# ----------------------------------------------------------------------------------------------------------------

def prepare(reading):
    """The copy task the models were trained on, with their own settings (the same for all), as reading.task.
    Returns what the outputs record about it."""
    name = "copy"
    try:
        found = [CopyTask(**{k: v for k, v in c.args.items() if k in ("alphabet_size", "n_train", "context")
                             and v is not None}) for c in reading.checkpoints]
    except (ValueError, TypeError) as error:
        raise UsageError(f"--task {name}: {error}") from None
    settings = [vars(t) for t in found]
    if any(s != settings[0] for s in settings):
        raise UsageError(f"these checkpoints were trained on different {name} tasks: evaluate them separately")
    reading.task = found[0]
    return {"task": name, **{k: v for k, v in settings[0].items() if isinstance(v, (int, float, type(None)))}}


def measure_copy(checkpoints, reading):
    """Per checkpoint (one seed of a model), greedy and teacher-forced accuracy at every length, each with its
    standard error over the strings (copy_accuracy)."""
    task, args = reading.task, reading.args
    lengths = args.copy_lengths or list(range(1, 4 * task.n_train + 1))
    records = []
    for c in checkpoints:
        record = {**c.record(), "n_train": task.n_train, "lengths": lengths, "greedy": [], "greedy_stderr": [],
                  "teacher_forced": [], "teacher_forced_stderr": []}
        with reading.progress(sum(args.copy_strings * (2 * n + 3) for n in lengths), f"{c.label}: copying") as bar:
            for n in lengths:  # one length at a time, for the bar
                with reading.autocast:
                    scores = copy_accuracy(c.model, task, [n], args.copy_strings, device=reading.device)[n]
                for kind, value in zip(("greedy", "greedy_stderr", "teacher_forced", "teacher_forced_stderr"), scores):
                    record[kind].append(value)
                bar.update(args.copy_strings * (2 * n + 3))
        records.append(record)
    return records


def plot_records(records, path, reading):
    plot_copy(copy_models(records), path, plots.describe(reading))


def tabulate_records(records, out, reading):
    tabulate_copy(copy_models(records), out / "copy_accuracy.csv", reading.args.copy_strings)
    return ["copy_accuracy.csv"]


def measure_along_training(checkpoints, reading):
    """Copy accuracy of every checkpoint a run kept along its training (ckpt_STEP.pt, and its ckpt.pt when that is
    a later step), each record with its step; a run's copies are seeds of the run's model name."""
    along = []
    for c in checkpoints:
        copies = sorted(c.folder.glob("ckpt_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        kept = [reading.checkpoint(str(p), label=c.name, train_len=c.T) for p in copies]
        along += kept + ([c] if c.step not in [k.step for k in kept] else [])
    return measure_copy(along, reading)


def plot_along_training_records(records, path, reading):
    plot_along_training(along_training(records), path, plots.describe(reading))


def tabulate_along_training(records, out, reading):
    models = along_training(records)
    print("\ngreedy copy accuracy beyond the training lengths against training step, mean ± std across seeds")
    for m in models:
        print_table([["step"] + [str(s) for s in m["steps"]],
                     [m["label"]] + [f"{x:.3f} ± {s:.3f}" for x, s in zip(m["greedy_beyond"], m["greedy_beyond_std"])]])
    return []


def measure_states(checkpoints, reading):
    """eval.py --state_stats on copy models: the state along copy examples of strings 4 n_train long, with the
    largest norm reached along examples of the longest training strings (the range training saw)."""
    task, args = reading.task, reading.args
    long = task.sequences(task.eval_strings(4 * task.n_train, args.copy_strings))  # (S, 8 n_train + 3)
    trained = task.sequences(task.eval_strings(task.n_train, args.copy_strings))  # (S, 2 n_train + 3)
    records = []
    for c in checkpoints:
        stats = reading.state_statistics(c.model, long, range(1, long.shape[1] + 1))
        seen = reading.state_statistics(c.model, trained, range(1, trained.shape[1] + 1))
        records.append({**c.record(), "positions": list(range(1, long.shape[1] + 1)), **stats,
                        "training_range": [max(layer) for layer in seen["norm"]]})
    return records


DIAGNOSTICS = [  # eval.diagnostics' entries, flag: the option that asks for one (None: always); eval.py
    # --state_stats reads copy examples with measure_states
    dict(name="copy_accuracy", flag=None, measure=measure_copy, plot=plot_records, tabulate=tabulate_records,
         summarise=copy_models),
    dict(name="copy_along_training", flag="along_training", measure=measure_along_training,
         plot=plot_along_training_records, tabulate=tabulate_along_training, summarise=along_training),
]
