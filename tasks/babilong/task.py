"""tasks/babilong/task.py: BABILong as a fine-tuning task (train.py --task babilong) and its prompts in tokens.

    task = BabilongTask(tokenizer, seq_len=2048)          the tokenizer of the model it fine-tunes
    BabilongTask(bytes, 256, ["qa1"], (1, 2))             a small-T setting: qa1 stories of 1 or 2 facts
                                                          (train.py --babilong_tasks qa1 --babilong_facts 1 2)
    inputs, targets = task.batch(batch_size, generator)  (B, L) each, L <= seq_len, targets -1 but on the answer

A training example is a generated qa1 or qa2 sample (one task and one length L per batch, L uniform up to the
training length T = seq_len, so nothing is padded) in the prompt of a fine-tuned model, followed by its answer:

    <context>\\n{facts in background text}\\n</context>\\n\\nQuestion: Where is Mary?\\nAnswer: kitchen.

The loss counts the answer's tokens only. A prompt is encoded in three pieces, the text before the context, the
context and the text after it, so that the context keeps the exact length it was generated with.
"""
import random

import torch

from tasks.babilong.babi import LOCATIONS, OBJECTS, PERSONS, TASKS, make_story
from tasks.babilong.dataset import check_facts, check_task, shortest_length
from tasks.babilong.haystack import Haystack, background_sentences
from tasks.babilong.prompts import answer_text, format_prompt

MARK = "\x00"  # stands for the context while the prompt around it is written


def prompt_tokens(tokenizer, task, context, question, few_shot):
    """The prompt of a sample as token ids: the text around the context and the context, each encoded alone."""
    before, after = format_prompt(task, MARK, question, few_shot).split(MARK)
    encode = tokenizer.encode_ordinary
    return encode(before) + encode(context.strip()) + encode(after)


class BabilongTask:
    """Generated BABILong examples for fine-tuning in a model's own tokenizer (needs_tokenizer), of at most seq_len
    tokens, the training length T. babilong_tasks: the bAbI tasks drawn from, one per batch; babilong_facts:
    (fewest, most) facts a story (default: bAbI's); sentences: the background (default: the standard library's
    docstrings). ValueError when seq_len cannot hold the longest story; UsageError for an unknown task or a bad
    number of facts."""

    name = "babilong"
    needs_tokenizer = True

    def __init__(self, tokenizer, seq_len=2048, babilong_tasks=TASKS, babilong_facts=None, sentences=None):
        self.tokenizer, self.max_len, self.tasks = tokenizer, seq_len, tuple(babilong_tasks)
        self.facts = tuple(babilong_facts) if babilong_facts else None  # (fewest, most) a story, or bAbI's
        for task in self.tasks:
            check_task(task)
            check_facts(task, self.facts)
        self.haystack = Haystack(tokenizer, background_sentences() if sentences is None else sentences)
        questions = [f"Where is {who}?" for who in PERSONS] + [f"Where is the {thing}?" for thing in OBJECTS]
        around = max(len(prompt_tokens(tokenizer, task, "", question, False)) for task in self.tasks
                     for question in questions)  # the most tokens the text around a context can take
        around += max(len(tokenizer.encode_ordinary(answer_text(place))) for place in LOCATIONS)
        self.min_len = around + max(shortest_length(task, tokenizer, self.facts) for task in self.tasks)
        if seq_len < self.min_len:
            raise ValueError(f"a BABILong example needs up to {self.min_len} tokens with this tokenizer; the "
                             f"training length {seq_len} is too short: give --seq_len {self.min_len} or more")

    @property
    def vocab_size(self):
        return self.tokenizer.n_vocab

    @property
    def train_tokens(self):
        return self.max_len

    def example(self, task, length, rng):
        """(inputs, targets), each (length,) int64: a random story of task hidden in background text, in the
        fine-tuned prompt, then its answer; targets -1 except where the next token is part of the answer."""
        story = make_story(task, rng, self.facts)
        encode = self.tokenizer.encode_ordinary
        before, after = format_prompt(task, MARK, story.question, few_shot=False).split(MARK)
        before, after, answer = encode(before), encode(after), encode(answer_text(story.target))
        context, _ = self.haystack.hide(story.facts, length - len(before) - len(after) - len(answer), rng)
        inputs = torch.tensor(before + encode(context) + after + answer)
        targets = torch.full_like(inputs, -1)
        targets[length - len(answer) - 1:-1] = inputs[length - len(answer):]
        return inputs, targets

    def batch(self, batch_size, generator):
        """batch_size examples of one task and one random length.  Returns (inputs, targets), each (B, L) int64
        on the CPU."""
        rng = random.Random(int(torch.randint(2 ** 62, (1,), generator=generator)))
        task, length = rng.choice(self.tasks), rng.randint(self.min_len, self.max_len)
        rows = [self.example(task, length, rng) for _ in range(batch_size)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
