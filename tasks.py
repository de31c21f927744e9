"""tasks.py: synthetic tasks with exactly scorable answers, generated on the fly from a seed.

Language-model loss shows length generalisation only on average; a synthetic task shows it as an answer that is
right or wrong at every length. Each task makes training batches in the shape train.py uses (inputs and targets
(B, L) int64, target -1 where the loss does not count) and scores a model's answers, so nothing is downloaded and
every run sees the same evaluation examples.

    copy   (Jelassi et al. 2024, "Repeat After Me"): read a random string, then write it again.
           sequence  start s_1 .. s_n copy s_1 .. s_n end      (2n + 3 tokens)
           A recurrent model must hold the whole string in its fixed-size state; trained on n <= n_train, the
           paper asks it to copy strings several times longer and scores the fraction of characters right.

    task = CopyTask(alphabet_size=10, n_train=16, context=64)   (context=C: rows of C tokens packed with examples;
                                                                  None: one example per row)
    inputs, targets = task.batch(batch_size, generator)                              (B, 2n + 3) each
    copy_accuracy(model, task, lengths, strings_per_length) -> {n: (greedy mean, its standard error,
                                                                    teacher-forced mean)}

    passkey  a 5-digit key hidden at some depth of filler text, asked for at the end (the paper's retrieval test):
           passkey_prompt(tokenizer, length, depth, key) builds the evaluation prompts eval.py --passkey reads, and
           PasskeyTask(tokenizer, max_len=2048) the fine-tuning examples of the paper's recipe, with the loss on the
           answer only. It needs the tokenizer of the model it fine-tunes, so train.py builds it from the base.
"""
import torch


class CopyTask:
    """Copy a random string over an alphabet of alphabet_size characters (token ids 0 .. A - 1); the special
    tokens start, copy and end follow (ids A, A + 1, A + 2). Training strings have a length drawn uniformly from
    [1, n_train]. Nothing is padded, in either of two batch layouts:

    context=None  one example per row, one string length per batch. The row ends exactly at the example's end
                  token, so the State a model returns after a batch is the state right after a whole example:
                  state passing hands the next batch what a model reading examples back to back would carry, and
                  every row of a zero-init batch reads its example from the true zero state. (Padding before an
                  example would move its start state.) The price: a batch's examples share one length; over many
                  batches the lengths are uniform in [1, n_train].
    context=C     the original task's layout: rows of exactly C tokens packed with examples back to back, lengths
                  drawn per example; the example cut by the row's end has no targets. Only a row's first example
                  starts from the zero state, so even zero-init training meets states left by earlier examples, and
                  state passing hands over a state in the middle of an example.
    """

    name = "copy"
    # the settings train.py exposes as flags (--alphabet_size ...); the defaults are the CPU-sized setting where a
    # zero-init Mamba-2 copies almost perfectly up to n_train and fails beyond it (README, "Synthetic copying")
    options = {"alphabet_size": "copy: characters in the alphabet (default 10)",
               "n_train": "copy: training strings have lengths 1 .. n_train (default 16)",
               "context": "copy: tokens per training row, examples packed back to back (default 64; 0: one example "
                          "per row)"}

    def __init__(self, alphabet_size=10, n_train=16, context=64):
        context = context or None  # 0 means one example per row
        if alphabet_size < 2 or n_train < 1:
            raise ValueError(f"the copy task needs alphabet_size >= 2 and n_train >= 1; got {alphabet_size}, "
                             f"{n_train}")
        if context is not None and context < 2 * n_train + 3:
            raise ValueError(f"a context of {context} tokens cannot hold the longest example ({2 * n_train + 3} "
                             f"tokens): raise context or lower n_train")
        self.alphabet_size, self.n_train, self.context = alphabet_size, n_train, context
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
        if self.context is None:
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
    n = strings.shape[1]
    logits, _, state = model(task.prompts(strings))
    logits, generated = logits[:, -1], []
    for i in range(n + 1):
        next_token = logits.argmax(-1)
        generated.append(next_token)
        if i < n:
            logits, state = model.step(next_token, state)
    return [task.answer(row) for row in torch.stack(generated, 1).tolist()]


@torch.no_grad()
def teacher_forced_accuracy(model, task, strings):
    """Per string, the fraction of copied characters whose argmax prediction is right given the true prefix (the
    whole example read from the zero state).  strings (B, n) -> (B,) float."""
    n = strings.shape[1]
    logits, _, _ = model(task.sequences(strings))
    predicted = logits[:, n + 1:2 * n + 1].argmax(-1)  # (B, n): the positions that predict the copied characters
    return (predicted == strings).float().mean(1)


def copy_accuracy(model, task, lengths, strings_per_length=32, seed=0, device="cpu"):
    """Character accuracy of copying the fixed evaluation strings (task.eval_strings) of every length.

    Returns {n: (greedy mean, greedy standard error over strings, teacher-forced mean)}. Greedy is what a user of
    the model sees: one wrong or missing character can derail the rest. Teacher-forced (the argmax at each copy
    position given the true prefix) is how the original task's code scores; it only asks whether the string is still
    in the state. The model is put in eval mode and restored after."""
    was_training = model.training
    model.eval()
    results = {}
    for n in lengths:
        strings = task.eval_strings(n, strings_per_length, seed).to(device)
        greedy = torch.tensor([char_accuracy(p, t) for p, t in zip(greedy_copies(model, task, strings),
                                                                    strings.tolist())], dtype=torch.float64)
        stderr = greedy.std().item() / len(greedy) ** 0.5 if len(greedy) > 1 else 0.0
        results[n] = (greedy.mean().item(), stderr, teacher_forced_accuracy(model, task, strings).mean().item())
    model.train(was_training)
    return results


TASKS = {"copy": CopyTask}


def make_task(name, settings):
    """The task called name, built from the entries of settings (a dict such as a run's arguments) that are its
    options and not None; the others keep the task's defaults."""
    cls = TASKS[name]
    return cls(**{k: settings[k] for k in cls.options if settings.get(k) is not None})


# ================================================================================================================
# Passkey retrieval
# ================================================================================================================
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
    options = {}  # no flags: T is max_len, the paper's 2048
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
