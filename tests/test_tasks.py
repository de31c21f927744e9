"""Tests of tasks/ (tasks/__init__.py, tasks/copy.py): the copy task's examples, its loss mask, and the scoring of
copies."""
import pytest
import torch
import torch.nn as nn

from model import LM, ModelConfig
from tasks import TASKS, make_task
from tasks.copy import (CopyTask, char_accuracy, copy_accuracy, copy_scores, greedy_copies,
                        teacher_forced_accuracy)


class CopyingStub(nn.Module):
    """A model with the LM interface that copies perfectly: its state is the list of tokens each row has read, and
    it predicts by rule (the next character of the string once the copy token is read, then the end token).
    constant=c makes it predict character c everywhere instead."""

    def __init__(self, task, constant=None):
        super().__init__()
        self.task, self.constant = task, constant

    def init_state(self, batch_size):
        return [[] for _ in range(batch_size)]

    def _next_token(self, history):
        if self.constant is not None:
            return self.constant
        if self.task.copy not in history:
            return 0
        at = history.index(self.task.copy)
        copied, n = len(history) - at - 1, at - 1
        return history[1 + copied] if copied < n else self.task.end

    def forward(self, idx, targets=None, state=None):
        state = [list(h) for h in (state or self.init_state(idx.shape[0]))]
        logits = torch.zeros(*idx.shape, self.task.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t, token in enumerate(row):
                state[b].append(token)
                logits[b, t, self._next_token(state[b])] = 1.0
        return logits, None, state

    def step(self, idx_t, state):
        logits, _, state = self(idx_t[:, None], state=state)
        return logits[:, 0], state

    greedy = LM.greedy  # the one greedy decoder, through step()


def test_examples_have_the_format_of_the_copy_task():
    task = CopyTask(alphabet_size=5, n_train=7, context=None)
    strings = task.strings(6, 3, torch.Generator().manual_seed(0))
    seqs = task.sequences(strings)
    assert seqs.shape == (3, 15) and seqs.dtype == torch.int64
    assert (seqs[:, 0] == task.start).all() and (seqs[:, 7] == task.copy).all() and (seqs[:, 14] == task.end).all()
    assert torch.equal(seqs[:, 1:7], strings) and torch.equal(seqs[:, 8:14], strings)
    assert strings.min() >= 0 and strings.max() < 5 and task.vocab_size == 8
    assert len({task.start, task.copy, task.end}) == 3 and min(task.start, task.copy, task.end) >= 5


def test_the_loss_counts_exactly_the_copied_half_and_the_end_token():
    task = CopyTask(alphabet_size=3, n_train=9, context=None)
    for n in (1, 4, 9):
        strings = task.strings(n, 2, torch.Generator().manual_seed(n))
        inputs, targets = task.inputs_and_targets(strings)
        assert inputs.shape == targets.shape == (2, 2 * n + 3)
        counted = (targets != -1).nonzero()[:, 1].unique().tolist()
        assert counted == list(range(n + 1, 2 * n + 2))  # the positions that read copy, s_1, ..., s_n
        assert torch.equal(targets[:, n + 1:2 * n + 1], strings) and (targets[:, 2 * n + 1] == task.end).all()
        assert torch.equal(targets[:, n + 1:2 * n + 2], inputs[:, n + 2:])  # targets are the next tokens


def test_batches_are_seeded_and_their_lengths_cover_the_training_range():
    task = TASKS["copy"](alphabet_size=4, n_train=5, context=None)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [task.batch(8, g) for _ in range(60)]

    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(a[0].shape != b[0].shape or not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    lengths = {(inputs.shape[1] - 3) // 2 for inputs, _ in first}
    assert lengths == {1, 2, 3, 4, 5} and all(inputs.shape[0] == 8 for inputs, _ in first)


def test_packed_rows_hold_whole_examples_back_to_back_and_mask_the_cut_one():
    task = CopyTask(alphabet_size=3, n_train=4, context=23)
    inputs, targets = task.batch(6, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (6, 23) and task.train_tokens == 23
    for row, row_targets in zip(inputs.tolist(), targets.tolist()):
        at, whole = 0, 0
        while at < 23:
            assert row[at] == task.start
            n = row.index(task.copy, at) - at - 1 if task.copy in row[at:] else 23  # the cut may hide the copy
            end = at + 2 * n + 3
            example_targets = row_targets[at:end]
            if end <= 23:  # a whole example: the copy, then the end token, and its copied half is counted
                whole += 1
                assert row[at + n + 2:end - 1] == row[at + 1:at + n + 1] and row[end - 1] == task.end
                assert example_targets == [-1] * (n + 1) + row[at + n + 2:end] + [-1]
            else:  # the example the row's end cuts teaches nothing
                assert set(example_targets) == {-1}
            at = end
        assert whole >= 2  # 23 tokens hold at least two examples of at most 11


def test_evaluation_strings_are_fixed_by_the_seed():
    task = CopyTask(alphabet_size=26, n_train=4, context=None)
    assert torch.equal(task.eval_strings(10, 5, seed=3), task.eval_strings(10, 5, seed=3))
    assert not torch.equal(task.eval_strings(10, 5, seed=3), task.eval_strings(10, 5, seed=4))
    assert not torch.equal(task.eval_strings(10, 5)[:, :9], task.eval_strings(9, 5))  # lengths do not share


def test_character_accuracy_on_hand_made_copies():
    true = [3, 1, 4, 1, 5]
    assert char_accuracy(true, true) == 1.0
    assert char_accuracy([0, 0, 0, 0, 0], true) == 0.0
    assert char_accuracy([3, 1, 4, 1, 6], true) == 4 / 5
    assert char_accuracy([3, 1, 4], true) == 3 / 5  # missing characters are wrong
    assert char_accuracy([], true) == 0.0
    assert char_accuracy(true + [9, 9, 9], true) == 5 / 8  # extra characters are wrong
    assert char_accuracy([1, 4, 1, 5], true) == 0.0  # a shifted copy is wrong everywhere


def test_answers_stop_at_the_end_token():
    task = CopyTask(alphabet_size=4, n_train=3)
    assert task.answer([1, 2, task.end, 3]) == [1, 2] and task.answer([1, 2, 3]) == [1, 2, 3]


def test_a_perfect_copier_scores_one_and_a_constant_one_scores_chance():
    task = CopyTask(alphabet_size=4, n_train=3, context=None)
    lengths = [1, 2, 5, 13]
    perfect = copy_accuracy(CopyingStub(task), task, lengths, strings_per_length=6, seed=7)
    assert sorted(perfect) == lengths
    assert all(r == (1.0, 0.0, 1.0, 0.0) for r in perfect.values())

    constant = copy_accuracy(CopyingStub(task, constant=2), task, lengths, strings_per_length=6, seed=7)
    for n, (greedy, stderr, forced, forced_stderr) in constant.items():
        strings = task.eval_strings(n, 6, seed=7)
        hits = (strings == 2).double().sum(1)  # it writes n + 1 twos, never the end token
        assert greedy == pytest.approx((hits / (n + 1)).mean().item(), abs=1e-12)
        assert stderr == pytest.approx((hits / (n + 1)).std().item() / 6 ** 0.5, abs=1e-12)
        assert forced == pytest.approx((hits / n).mean().item(), abs=1e-6)
    assert 0 < constant[13][0] < 0.5  # about 1 / alphabet_size


def reread_greedily(model, prompts, new_tokens):
    """Greedy decoding without step() or a carried state: the whole sequence so far is read again from the zero
    state for every new token.  (B, L) -> (B, new_tokens)"""
    sequences = prompts
    with torch.no_grad():
        for _ in range(new_tokens):
            sequences = torch.cat([sequences, model(sequences)[0][:, -1].argmax(-1, keepdim=True)], 1)
    return sequences[:, prompts.shape[1]:]


def test_greedy_copies_through_step_match_the_models_own_generation():
    torch.manual_seed(0)
    task = CopyTask(alphabet_size=6, n_train=4, context=None)
    model = LM(ModelConfig(vocab_size=task.vocab_size, d_model=32, n_layer=2, mixer="mamba2", d_state=16,
                           headdim=16, chunk_size=16)).eval()
    strings = task.eval_strings(7, 3)
    generated = reread_greedily(model, task.prompts(strings), 8)
    assert greedy_copies(model, task, strings) == [task.answer(row) for row in generated.tolist()]
    model.train()
    result = copy_accuracy(model, task, [3, 7], strings_per_length=3)
    assert model.training and all(0 <= g <= 1 and 0 <= f <= 1 for g, _, f, _ in result.values())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="alphabet_size"):
        CopyTask(alphabet_size=1, n_train=4)
    with pytest.raises(ValueError, match="n_train"):
        CopyTask(alphabet_size=4, n_train=0)
    with pytest.raises(ValueError, match="cannot hold the longest example"):
        CopyTask(alphabet_size=4, n_train=10, context=22)


def test_make_task_takes_only_the_tasks_own_settings():
    task = make_task("copy", {"alphabet_size": 7, "n_train": 5, "context": None, "lr": 1e-3, "seed": 3})
    assert (task.alphabet_size, task.n_train, task.context) == (7, 5, 0)  # None or 0: one example per row
    assert task.train_tokens == 13 and task.vocab_size == 10
    assert make_task("copy", {"alphabet_size": 7, "n_train": 5, "context": 20}).train_tokens == 20


def test_copy_scores_read_once_what_the_definitions_read_twice():
    """The fast path eval.py uses (each example read once, greedy decoding from the prompt's state) gives the
    scores of the two definitions, greedy_copies and teacher_forced_accuracy."""
    torch.manual_seed(0)
    task = CopyTask(alphabet_size=6, n_train=4)
    model = LM(ModelConfig(vocab_size=task.vocab_size, d_model=32, n_layer=2, mixer="mamba2", d_state=16,
                           headdim=16, chunk_size=16)).eval()
    for n in (1, 9):
        strings = task.eval_strings(n, 5)
        greedy, forced = copy_scores(model, task, strings)
        copies = greedy_copies(model, task, strings)
        assert greedy.tolist() == [char_accuracy(c, s) for c, s in zip(copies, strings.tolist())]
        assert torch.allclose(forced, teacher_forced_accuracy(model, task, strings).double())
