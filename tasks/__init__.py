"""tasks: synthetic tasks with exactly scorable answers, generated on the fly from a seed.

Language-model loss shows length generalisation only on average; a task shows it as an answer that is right or wrong
at every length. Each task makes training batches in the shape train.py uses (inputs and targets (B, L) int64, target
-1 where the loss does not count), says its vocab_size and its training length train_tokens, and whether it is
written in a language model's words (needs_tokenizer); nothing is downloaded and every run sees the same evaluation
examples.
    copy     tasks/copy.py: copy a random string; trained on short strings, asked to copy longer ones
    passkey  tasks/passkey.py: a 5-digit key hidden in filler text, asked for at the end
    babilong tasks/babilong/: BABILong, bAbI's facts hidden in long text, a question about them at the end; read
             from the benchmark's published sets or generated, for fine-tuning and evaluation

train.py --task NAME builds one (build) and trains on it through TaskBatches; eval.py reads a task's own measurements.
"""
import inspect

import torch

from data import tokenizer_mismatch
from runs import UsageError
from tasks.copy import CopyTask
from tasks.babilong.task import BabilongTask
from tasks.passkey import PasskeyTask

TASKS = {"copy": CopyTask, "passkey": PasskeyTask, "babilong": BabilongTask}


def make_task(name, settings):
    """The task called name, built from the entries of settings (a run's options) that are arguments of its class
    and not None; the others keep the class's defaults."""
    cls = TASKS[name]
    parameters = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in settings.items() if k in parameters and v is not None})


def build(args):
    """The task of args.task with the run's settings (UsageError when they do not make one). A task in words is
    written in args.tokenizer, the tokenizer of the model it fine-tunes (runs.resolve), and babilong's examples
    are at most args.seq_len tokens long."""
    cls = TASKS[args.task]
    try:
        if not cls.needs_tokenizer:
            return make_task(args.task, vars(args))
        if args.tokenizer is None:
            raise UsageError(f"--task {args.task} writes its examples in the tokens of the model it fine-tunes, but "
                             f"{args.init_from} does not say which tokenizer it was trained with: fine-tune a model "
                             f"trained on a prepared corpus, or a folder that has its tokenizer.json beside the "
                             f"weights")
        from corpora.tokenizer import get_tokenizer

        return make_task(args.task, {**vars(args), "tokenizer": get_tokenizer(args.tokenizer)})
    except ValueError as error:
        raise UsageError(f"--task {args.task}: {error}") from None


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
