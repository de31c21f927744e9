"""tasks/passkey.py: passkey retrieval, the paper's retrieval test: its prompts, scoring, fine-tuning examples and
its evaluation (eval.py --passkey).

A 5-digit key is hidden at relative depth d of filler text and asked for at the end. The paper evaluates at depths
0.1, 0.5 and 0.9 of prompts from 2k to 256k tokens, answered by greedy decoding (eval.py --passkey), and
fine-tunes on examples no longer than the training length (PasskeyTask) so that a model that generalises in length
finds the key far beyond it. Prompts are in words, so the task needs a tokenizer (data.get_tokenizer) and is only
meaningful for models trained on natural language.

The filler is the paper's line of five short sentences again and again (repeated), or, so that the state a long
prompt reaches is not that of one sentence seen over and over, natural sentences: the standard library's docstrings
from a random place on, as BABILong's background (varied; train.py --passkey_filler, eval.py --passkey_filler).
"""
import itertools

import numpy as np
import torch

import plots
from runs import piece_length, pyplot

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


def filler_pieces(tokenizer, filler, start=0):
    """Endless filler as lists of token ids: PASSKEY_FILLER's line again and again (repeated), or the standard
    library's docstring sentences from sentence number start on, going round them (varied)."""
    if filler == "repeated":
        return itertools.repeat(tokenizer.encode_ordinary(PASSKEY_FILLER))
    from tasks.babilong.haystack import stdlib_sentences  # BABILong's background text, read only when asked for

    sentences = stdlib_sentences()
    return (tokenizer.encode_ordinary(sentences[(start + i) % len(sentences)] + " ") for i in itertools.count())


def split_filler(pieces, room, depth):
    """room tokens of filler taken from pieces, split where a piece ends nearest to depth * room.
    Returns (ids before the key, ids after it)."""
    tokens, boundaries = [], [0]
    while len(tokens) < room:
        tokens += next(pieces)
        boundaries.append(min(len(tokens), room))
    at = min(boundaries, key=lambda boundary: abs(boundary - depth * room))
    return tokens[:at], tokens[at:room]


def passkey_prompt(tokenizer, length, depth, key, filler="repeated", start=0):
    """Token ids of about `length` tokens: intro, filler with the key sentence at relative depth `depth`
    (0 = right after the intro, 1 = right before the question, placed between filler sentences), question.
    The paper's repeated filler comes in whole lines; varied filler (from sentence start on) is cut to make the
    length exact."""
    encode = tokenizer.encode_ordinary
    intro, question = encode(PASSKEY_INTRO), encode(PASSKEY_QUESTION)
    needle = encode(passkey_needle(key))
    if filler == "varied":
        room = max(0, length - len(intro) - len(needle) - len(question))
        before, after = split_filler(filler_pieces(tokenizer, filler, start), room, depth)
        return intro + before + needle + after + question
    line = encode(PASSKEY_FILLER)
    repeats = max(1, (length - len(intro) - len(needle) - len(question)) // len(line))
    at = round(depth * repeats)
    return intro + line * at + needle + line * (repeats - at) + question


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

    def __init__(self, tokenizer, max_len=2048, passkey_filler="repeated"):
        encode = tokenizer.encode_ordinary
        self.tokenizer, self.max_len, self.filler = tokenizer, max_len, passkey_filler
        self.intro, self.question = encode(PASSKEY_INTRO), encode(PASSKEY_QUESTION)
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

    def example(self, length, depth, key, start=0):
        """(inputs, targets), each (length,) int64: the prompt and the answer, targets -1 except where the next
        token is part of the answer. start: the first sentence of varied filler."""
        encode = self.tokenizer.encode_ordinary
        needle, answer = encode(passkey_needle(key)), encode(passkey_answer(key))
        room = length - len(self.intro) - len(needle) - len(self.question) - len(answer)
        if room < 0:
            raise ValueError(f"key {key} does not fit in {length} tokens")
        before, after = split_filler(filler_pieces(self.tokenizer, self.filler, start), room, depth)
        tokens = self.intro + before + needle + after + self.question + answer
        inputs = torch.tensor(tokens)
        targets = torch.full_like(inputs, -1)
        targets[length - len(answer) - 1:-1] = inputs[length - len(answer):]
        return inputs, targets

    def batch(self, batch_size, generator):
        """batch_size examples of one random length.  Returns (inputs, targets), each (B, L) int64 on the CPU."""
        length = int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=generator))
        keys = torch.randint(10000, 100000, (batch_size,), generator=generator).tolist()
        depths = torch.rand(batch_size, generator=generator, dtype=torch.float64).tolist()
        starts = torch.randint(2 ** 31, (batch_size,), generator=generator).tolist() if self.filler == "varied" \
            else [0] * batch_size  # (drawn only for varied filler: the paper's examples stay as they were)
        rows = [self.example(length, depth, key, start) for depth, key, start in zip(depths, keys, starts)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# ----------------------------------------------------------------------------------------------------------------
# eval.py --passkey: accuracy per prompt length and depth of the key, as a heatmap per model
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths, depths, trials, device, autocast, chunk, seed=0, bar=None,
                     filler="repeated"):
    """Accuracy[length][depth] over `trials` random keys, greedy decoding through LM.step."""
    rng = np.random.default_rng(seed)
    accuracy = []
    for length in lengths:
        row = []
        for depth in depths:
            keys = rng.integers(10000, 100000, size=trials).tolist()
            starts = rng.integers(2 ** 31, size=trials).tolist() if filler == "varied" else [0] * trials
            prompts = [passkey_prompt(tokenizer, length, depth, key, filler, start) for key, start in zip(keys, starts)]
            correct = []
            # a key's digits may take different numbers of tokens: decode prompts of equal length together
            for size in sorted({len(p) for p in prompts}):
                group = [(p, k) for p, k in zip(prompts, keys) if len(p) == size]
                answers = greedy_answers(model, [p for p, _ in group], 8, autocast, chunk)
                correct += [score_answer(tokenizer.decode(a), k) for a, (_, k) in zip(answers, group)]
                if bar is not None:
                    bar.update(length * len(group))  # the nominal length: the bar ends at its total
            row.append(float(np.mean(correct)))
        accuracy.append(row)
    return accuracy


def greedy_answers(model, prompts, new_tokens, autocast, chunk):
    """Greedy continuations of equally long prompts (lists of ids): read in pieces of at most chunk tokens, then
    stepped token by token.  Returns a list of lists of new_tokens ids."""
    tokens = torch.tensor(prompts, device=next(model.parameters()).device)
    with autocast:
        for _, _, logits, state in model.read(tokens, piece_length(chunk, len(tokens), model.cfg.vocab_size)):
            logits = logits[:, -1]
        return model.greedy(logits, state, new_tokens).tolist()


def measure_passkey(checkpoints, reading):
    args, tokenizer = reading.args, reading.corpus.tokenizer()
    lengths, depths = list(args.passkey_lengths or PASSKEY_LENGTHS), list(args.passkey_depths or PASSKEY_DEPTHS)
    records = []
    for c in checkpoints:
        total = sum(lengths) * len(depths) * args.passkey_trials
        with reading.progress(total, f"{c.label}: passkey") as bar:
            accuracy = passkey_accuracy(c.model, tokenizer, lengths, depths, args.passkey_trials, reading.device,
                                        reading.autocast, args.chunk, bar=bar, filler=args.passkey_filler)
        records.append({**c.record(), "lengths": lengths, "depths": depths, "filler": args.passkey_filler,
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
    fig.suptitle(f"Passkey retrieval: is the 5-digit key found?\n{plots.describe(reading)}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


DIAGNOSTIC = dict(name="passkey", measure=measure_passkey, plot=plot_passkey)  # an entry of eval.diagnostics
