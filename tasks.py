"""tasks.py: synthetic tasks with exactly scorable answers, generated on the fly from a seed.

Language-model loss shows length generalisation only on average; a synthetic task shows it as an answer that is
right or wrong at every length. Each task makes training batches in the shape train.py uses (inputs and targets
(B, L) int64, target -1 where the loss does not count) and scores a model's answers, so nothing is downloaded and
every run sees the same evaluation examples.

    copy     Jelassi et al. 2024, "Repeat After Me: Transformers are Better than State Space Models at Copying"
             (arXiv 2402.01032), the task the paper uses for its one small-scale experiment: read a random string,
             then write it again.   start s_1 .. s_n copy s_1 .. s_n end   (2n + 3 tokens)
             A recurrent model must hold the whole string in its fixed-size state; trained on n <= n_train, it is
             asked to copy strings several times longer, scored by the fraction of characters right.
    passkey  a 5-digit key hidden at some depth of filler text, asked for at the end (the paper's retrieval test):
             passkey_prompt() builds the prompts eval.py --passkey reads, and PasskeyTask the fine-tuning examples
             of the paper's recipe, with the loss on the answer only.

    task = CopyTask(alphabet_size=10, n_train=16)        one example per row (context=0), the experiment's layout
    inputs, targets = task.batch(batch_size, generator)  (B, 2n + 3) each
    copy_accuracy(model, task, lengths, strings_per_length) -> {n: (greedy, its stderr, teacher-forced, its stderr)}

The second half of the file reports copy accuracy for eval.py --task copy (seeds of one model grouped, tables,
figures), so that the copy experiment lives in one place.
"""
import csv
import inspect

import numpy as np
import torch

from data import tokenizer_mismatch


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
    return _decode(model, task, logits[:, -1], state, strings.shape[1])


@torch.no_grad()
def teacher_forced_accuracy(model, task, strings):
    """Per string, the fraction of copied characters whose argmax prediction is right given the true prefix (the
    whole example read from the zero state).  strings (B, n) -> (B,) float."""
    n = strings.shape[1]
    logits, _, _ = model(task.sequences(strings))
    predicted = logits[:, n + 1:2 * n + 1].argmax(-1)  # (B, n): the positions that predict the copied characters
    return (predicted == strings).float().mean(1)


def _decode(model, task, logits, state, n):
    """n + 1 greedy tokens from logits (B, V) and the State after the prompt.  Returns B lists of ids."""
    generated = []
    for i in range(n + 1):
        next_token = logits.argmax(-1)
        generated.append(next_token)
        if i < n:
            logits, state = model.step(next_token, state)
    return [task.answer(row) for row in torch.stack(generated, 1).tolist()]


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
    copies = _decode(model, task, prompt_logits[:, -1], state, n)
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


class TaskBatches:
    """What train.py reads from a task: training batches, and fixed held-out batches whose masked loss (targets -1
    do not count) is the validation loss. args: the run's options (batch_size, eval_seqs, seed).
    next() -> (inputs, targets, restarted = None): no example continues
    another, so tbptt hands states on between examples as state_passing does. A task in words (passkey) records
    its tokenizer as a corpus does, so that eval.py's checks of tokens apply."""

    def __init__(self, task, args, seed):
        self.task, self.batch_size = task, args.batch_size
        text = getattr(task, "tokenizer", None)
        self.tokenizer = {"tokenizer": text and text.name, "tokenizer_sha256": getattr(text, "sha256", None)}
        self.rng = torch.Generator().manual_seed(seed)
        held_out = torch.Generator().manual_seed(2 ** 40 + args.seed)  # the same on every process, unlike rng
        self.val_batches = [task.batch(args.batch_size, held_out) for _ in range(args.eval_seqs)]

    def next(self):
        return (*self.task.batch(self.batch_size, self.rng), None)

    @torch.no_grad()
    def validate(self, model, device, autocast):
        total, count = 0.0, 0
        for inputs, targets in self.val_batches:
            with autocast:
                _, loss, _ = model(inputs.to(device), targets.to(device))
            counted = (targets >= 0).sum().item()  # the positions whose loss counts
            total, count = total + loss.item() * counted, count + counted
        return {"val_loss": total / count}

    def refusal(self, model):
        mismatch = self.tokenizer["tokenizer"] and tokenizer_mismatch(self.tokenizer, model.trained_on)
        if mismatch:  # a tokenizer.json replaced since the model was trained
            return f"{mismatch}: put back the tokenizer the model was trained with"
        if model.cfg.vocab_size < self.task.vocab_size:
            return f"its vocabulary of {model.cfg.vocab_size} tokens is smaller than the task's {self.task.vocab_size}"
        return None

    def describe(self):
        return {"name": f"task {self.task.name}", "task": self.task.name, "vocab_size": self.task.vocab_size,
                **self.tokenizer, "fingerprint": None}

    def state_dict(self):
        return {"data_rng": self.rng.get_state(), "streams": None}

    def load_state_dict(self, state):
        self.rng.set_state(state["data_rng"])


TASKS = {"copy": CopyTask}


def make_task(name, settings):
    """The task called name, built from the entries of settings (a run's options) that are arguments of its class
    and not None; the others keep the class's defaults."""
    cls = TASKS[name]
    parameters = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in settings.items() if k in parameters and v is not None})


# ----------------------------------------------------------------------------------------------------------------
# Reporting copy accuracy (eval.py --task copy): seeds of one model grouped, tables, figures
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


def print_table(rows, left=0):
    """Rows of strings printed in aligned columns: the first `left` columns aligned left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows))


def pyplot():
    """matplotlib's pyplot on the file-only backend (no screen needed), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval
# ----------------------------------------------------------------------------------------------------------------
#
# A 5-digit key is hidden at relative depth d of filler text and asked for at the end. The paper evaluates at depths
# 0.1, 0.5 and 0.9 of prompts from 2k to 256k tokens, answered by greedy decoding (eval.py --passkey), and
# fine-tunes on examples no longer than the training length (PasskeyTask) so that a model that generalises in length
# finds the key far beyond it. Prompts are in words, so the task needs a tokenizer (data.get_tokenizer) and is only
# meaningful for models trained on natural language.

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
PASSKEY_LENGTHS = tuple(2 ** k for k in range(11, 19))  # 2k .. 256k tokens


def passkey_needle(key):
    return f"The pass key is {key}. Remember it. {key} is the pass key.\n"


def passkey_answer(key):
    """What follows the question: the key (the first five digits are scored)."""
    return f" {key}."


def passkey_prompt(tokenizer, length, depth, key):
    """Token ids of about `length` tokens: intro, filler with the key sentence at relative depth `depth`
    (0 = right after the intro, 1 = right before the question, placed between filler sentences), question."""
    encode = tokenizer.encode_ordinary
    intro, question = encode(PASSKEY_INTRO), encode(PASSKEY_QUESTION)
    needle = encode(passkey_needle(key))
    filler = encode(PASSKEY_FILLER)
    repeats = max(1, (length - len(intro) - len(needle) - len(question)) // len(filler))
    at = round(depth * repeats)
    return intro + filler * at + needle + filler * (repeats - at) + question


def score_answer(text, key):
    """Correct when the first five digits of the answer are the key."""
    digits = "".join(ch for ch in text if ch.isdigit())
    return digits[:5] == str(key)


class PasskeyTask:
    """Passkey examples for fine-tuning: prompt and answer in exactly L tokens, L uniform in [min_len, max_len]
    (one L per batch, so nothing is padded), a random 5-digit key at a depth uniform in [0, 1]. The loss counts only
    the answer's tokens. The filler's last sentence is cut to make the length exact; the key sentence goes between
    filler sentences, at the boundary nearest to its depth.

    train.py --task passkey builds it with the tokenizer of the model it fine-tunes (needs_tokenizer),
    PasskeyTask(data.get_tokenizer(spec), max_len=2048).
    """

    name = "passkey"
    needs_tokenizer = True

    def __init__(self, tokenizer, max_len=2048):
        encode = tokenizer.encode_ordinary
        self.tokenizer, self.max_len = tokenizer, max_len
        self.intro, self.filler, self.question = encode(PASSKEY_INTRO), encode(PASSKEY_FILLER), encode(PASSKEY_QUESTION)
        # room for any key: a token covers at least one byte, so the key's sentences take at most their byte count
        longest = len((passkey_needle(99999) + passkey_answer(99999)).encode())
        self.min_len = len(self.intro) + len(self.question) + longest
        if max_len < self.min_len:
            raise ValueError(f"a passkey example needs up to {self.min_len} tokens with this tokenizer; max_len "
                             f"{max_len} is too short")

    @property
    def vocab_size(self):
        return self.tokenizer.n_vocab

    @property
    def train_tokens(self):
        return self.max_len

    def example(self, length, depth, key):
        """(inputs, targets), each (length,) int64: the prompt and the answer, targets -1 except where the next
        token is part of the answer."""
        encode = self.tokenizer.encode_ordinary
        needle, answer = encode(passkey_needle(key)), encode(passkey_answer(key))
        room = length - len(self.intro) - len(needle) - len(self.question) - len(answer)
        if room < 0:
            raise ValueError(f"key {key} does not fit in {length} tokens")
        filler = (self.filler * (room // len(self.filler) + 1))[:room]
        at = min([*range(0, room, len(self.filler)), room], key=lambda boundary: abs(boundary - depth * room))
        tokens = self.intro + filler[:at] + needle + filler[at:] + self.question + answer
        inputs = torch.tensor(tokens)
        targets = torch.full_like(inputs, -1)
        targets[length - len(answer) - 1:-1] = inputs[length - len(answer):]
        return inputs, targets

    def batch(self, batch_size, generator):
        """batch_size examples of one random length.  Returns (inputs, targets), each (B, L) int64 on the CPU."""
        length = int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=generator))
        keys = torch.randint(10000, 100000, (batch_size,), generator=generator).tolist()
        depths = torch.rand(batch_size, generator=generator, dtype=torch.float64).tolist()
        rows = [self.example(length, depth, key) for depth, key in zip(depths, keys)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


TASKS["passkey"] = PasskeyTask
