"""Tests of tasks/babilong: generated samples obey bAbI's rules and have their exact length, the answer check agrees
with BABILong's rule, the published sets are read in the hub's layout, and bad input is refused in one line."""
import json
import random
import re

import pytest
import torch

from corpora import DataError
from corpora.tokenizer import get_tokenizer
from model import LM, ModelConfig
from runs import UsageError, load_checkpoint, load_model, model_payload, save_checkpoint
from tasks.babilong import (LABELS, Haystack, background_sentences, format_prompt, generated_set, is_correct,
                            make_story, read_set, shortest_length)
from tasks.babilong.babi import PERSONS

BACKGROUND = [  # prose that names nothing of bAbI's world, some sentences with words of several tokens
    "The river ran quietly past the old mill and into the valley below.",
    "Nobody in the village remembered who had first planted the orchard.",
    "Extraordinarily unpredictable weather characterised that particular autumn.",
    "A lantern swung from the beam, throwing long shadows across the floor.",
    "They spoke of harvests, of debts, and of the long winter ahead.",
    "Somewhere beyond the hills a dog barked twice and then fell silent.",
]


def gpt2_or_skip():
    try:
        return get_tokenizer("gpt2")
    except DataError:
        pytest.skip("the gpt2 vocabulary is neither cached nor downloadable here")


def tokenizer(name):
    return gpt2_or_skip() if name == "gpt2" else get_tokenizer(name)


# ----------------------------------------------------------------------------------------------------------------
# An independent reasoner: reads the facts back from the text and works out the answer
# ----------------------------------------------------------------------------------------------------------------

FACT = re.compile(r"(Mary|John|Daniel|Sandra) (?:(moved to|went to|went back to|journeyed to|travelled to) the "
                  r"(\w+)|(picked up|got|grabbed|took) the (\w+) there|(dropped|discarded|put down|left) the (\w+))\.")


def facts_in(text):
    return [m.group(0) for m in FACT.finditer(text)]


def answer_of(facts, question):
    """Where the person or object asked about is, by replaying the facts; asserts that each fact is possible (a
    pick-up by someone whose place is known, of an object nobody holds; a drop by its holder) and that the answer
    is determined."""
    place, holder, lies = {}, {}, {}
    for fact in facts:
        person, _, to, _, taken, _, dropped = FACT.fullmatch(fact).groups()
        if to:
            place[person] = to
        elif taken:
            assert person in place and taken not in holder
            assert lies.get(taken, place[person]) == place[person]  # it lies where they are, or was never seen
            holder[taken] = person
        else:
            assert holder.pop(dropped) == person
            lies[dropped] = place[person]
    asked = re.fullmatch(r"Where is (?:the )?(\w+)\?", question).group(1)
    if asked in PERSONS:
        return place[asked]
    return place[holder[asked]] if asked in holder else lies[asked]


@pytest.mark.parametrize("task", ["qa1", "qa2"])
def test_generated_answers_follow_from_the_facts(task):
    samples = generated_set(task, 2000, 60, get_tokenizer("bytes"), sentences=BACKGROUND)
    assert len({s["target"] for s in samples}) >= 4  # the answers vary over the locations
    for sample in samples:
        facts = facts_in(sample["input"])
        assert len(facts) == len(sample["facts"]) >= 2
        assert answer_of(facts, sample["question"]) == sample["target"]
        assert sample["target"] in LABELS[task]
        asked = sample["question"].rstrip("?").split()[-1]
        supporting = [facts[i] for i in sample["supporting"]]  # the facts the answer rests on
        if task == "qa1":  # the person's last move
            assert supporting == [[f for f in facts if f.startswith(asked)][-1]]
        assert any(asked in f for f in supporting) and any(sample["target"] in f for f in supporting)

def test_qa2_needs_two_facts():
    """qa2's answer rests on two facts: the object's pick-up or drop, and its holder's move."""
    rng = random.Random(3)
    stories = [make_story("qa2", rng) for _ in range(200)]
    assert all(len(s.supporting) == 2 for s in stories)
    assert all(s.target in s.facts[s.supporting[0]] + s.facts[s.supporting[1]] for s in stories)
    held = [s for s in stories if any(verb in s.facts[s.supporting[0]] for verb in (" picked", " got", " grabbed",
                                                                                       " took"))]
    assert 20 < len(held) < 190  # both kinds of answer occur: held objects and dropped ones


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
@pytest.mark.parametrize("extra", [None, 0, 1, 333, 3000])
def test_facts_keep_their_order_and_the_context_its_exact_length(name, extra):
    tok = tokenizer(name)
    haystack = Haystack(tok, BACKGROUND)
    rng = random.Random(1)
    length = 0 if extra is None else shortest_length("qa2", tok) + extra  # None: the facts alone
    for _ in range(10):
        story = make_story("qa2", rng)
        text, offsets = haystack.hide(story.facts, length, rng)
        assert facts_in(text) == list(story.facts)  # all of them, in their order, each whole
        tokens = tok.encode_ordinary(text)
        if length:
            assert len(tokens) == length and not text.startswith(story.facts[0])  # background comes first
        for offset, fact in zip(offsets, story.facts):  # each fact's tokens start where the offsets say
            assert tok.decode(tokens[offset:]).lstrip().startswith(fact)


def test_the_standard_library_background():
    sentences = background_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) > 0.8 * len(sentences)
    assert not any(facts_in(s) for s in sentences)
    samples = generated_set("qa1", 2048, 3, gpt2_or_skip(), seed=5)
    assert samples == generated_set("qa1", 2048, 3, gpt2_or_skip(), seed=5)  # the same for the same seed
    assert samples != generated_set("qa1", 2048, 3, gpt2_or_skip(), seed=6)
    assert all(len(gpt2_or_skip().encode_ordinary(s["input"])) == 2048 for s in samples)


# ----------------------------------------------------------------------------------------------------------------
# The answer check
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, correct", [
    ("The most recent location of Mary is kitchen.", True),
    ("\nAnswer: kitchen. Question: Where is John? Answer: garden.", True),  # what follows the first sentence: ignored
    ("KITCHEN", True),
    ("The most recent location of Mary is garden.", False),
    ("Mary is in the kitchen or the garden.", False),  # two labels
    ("Mary is not here. She is in the kitchen.", False),  # right, but in the second sentence
    ("kitchen <example> garden", True),  # a model writing an example of its own: cut there
    ("", False),
])
def test_answer_check_agrees_with_babilongs_rule(output, correct):
    assert is_correct("qa1", output, "kitchen", "Where is Mary?") is correct


def test_labels_of_the_question_do_not_count():
    question = "Where was the apple before the kitchen?"  # a label in the question is never the answer
    assert is_correct("qa1", "Before the kitchen the apple was in the garden.", "garden", question)
    assert not is_correct("qa1", "Before the kitchen the apple was in the garden.", "kitchen", question)


def test_prompt_is_babilongs_template():
    prompt = format_prompt("qa2", "  Mary got the milk there. ", "Where is the milk?")
    assert prompt.startswith("I give you context") and prompt.endswith(
        "<context>\nMary got the milk there.\n</context>\n\nQuestion: Where is the milk?")
    assert "<example>" in prompt and "The \u2019item\u2019 is in \u2019location\u2019." in prompt
    assert format_prompt("qa1", "x", "Where is Mary?", few_shot=False) == \
        "<context>\nx\n</context>\n\nQuestion: Where is Mary?"


# ----------------------------------------------------------------------------------------------------------------
# Reading the published sets
# ----------------------------------------------------------------------------------------------------------------

def hub_sample(target="bathroom"):
    return {"input": "Some text. Mary moved to the bathroom. More text.", "question": "Where is Mary?",
            "target": target}


def test_a_folder_in_the_hubs_layout_is_read(tmp_path):
    (tmp_path / "babilong" / "data" / "qa1").mkdir(parents=True)
    (tmp_path / "babilong" / "data" / "qa1" / "4k.json").write_text(json.dumps([hub_sample()] * 3))
    assert read_set(str(tmp_path / "babilong"), "qa1", "4k") == [hub_sample()] * 3
    (tmp_path / "generated" / "qa2").mkdir(parents=True)  # BABILong's generator's layout, in JSON Lines
    (tmp_path / "generated" / "qa2" / "0k.json").write_text("\n".join(json.dumps(hub_sample("garden"))
                                                                      for _ in range(2)) + "\n")
    assert read_set(str(tmp_path / "generated"), "qa2", "0k") == [hub_sample("garden")] * 2
    assert read_set(str(tmp_path / "babilong" / "data" / "qa1" / "4k.json"), "qa1", "4k")[0]["target"] == "bathroom"


def test_a_hub_name_is_read_through_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "cached.json").write_text(json.dumps([hub_sample()]))
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, repo_type: asked.append((repo, filename, repo_type)) or
                        str(tmp_path / "cached.json"))
    assert read_set("RMT-team/babilong", "qa1", "16k") == [hub_sample()]
    assert asked == [("RMT-team/babilong", "data/qa1/16k.json", "dataset")]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("records", [
    [hub_sample(), {"input": "x", "question": "Where is Mary?"}],  # no target
    [{"input": "x", "question": "Where is Mary?", "target": 3}],  # not a string
    [{"input": ["x"], "question": "Where is Mary?", "target": "garden"}],
    [hub_sample("yes")],  # not an answer of qa1
    ["just a string"],
    [],
    {"input": "x"},
])
def test_bad_samples_are_refused(tmp_path, records):
    (tmp_path / "set.json").write_text(json.dumps(records))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DataError):
        read_set(str(tmp_path / "set.json"), "qa1", "0k")
    assert sorted(tmp_path.rglob("*")) == before


def test_bad_names_and_lengths_are_refused(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    def offline(*args, **kwargs):
        raise errors.LocalEntryNotFoundError("cannot reach huggingface.co and the file is not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):  # names the way out
        read_set("nobody/no-such-set", "qa1", "0k")
    with pytest.raises(DataError):
        read_set(str(tmp_path / "missing.json"), "qa1", "0k")
    with pytest.raises(DataError):
        read_set(str(tmp_path), "qa1", "0k")  # a folder without the set
    with pytest.raises(UsageError):
        read_set("RMT-team/babilong", "qa21", "0k")
    with pytest.raises(UsageError):
        read_set("RMT-team/babilong", "qa1", "4kb")
    with pytest.raises(UsageError):
        generated_set("qa3", 1000, 1, get_tokenizer("bytes"), sentences=BACKGROUND)
    shortest = shortest_length("qa1", get_tokenizer("bytes"))
    with pytest.raises(UsageError):
        generated_set("qa1", shortest - 1, 1, get_tokenizer("bytes"), sentences=BACKGROUND)
    assert len(generated_set("qa1", shortest, 2, get_tokenizer("bytes"), sentences=BACKGROUND)) == 2
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning (train.py --task babilong) and evaluation (eval.py --task babilong)
# ----------------------------------------------------------------------------------------------------------------

def test_training_examples_count_the_answer_only():
    from tasks.babilong.task import BabilongTask

    bytes_tokens = get_tokenizer("bytes")
    task = BabilongTask(bytes_tokens, seq_len=1200, sentences=BACKGROUND)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        inputs, targets = task.batch(3, generator)
        assert inputs.shape == targets.shape and task.min_len <= inputs.shape[1] <= 1200
        for row, target in zip(inputs.tolist(), targets.tolist()):
            text = bytes_tokens.decode(row)
            context, question = re.fullmatch(r"<context>\n(.*)\n</context>\n\nQuestion: (.*\?)\nAnswer: \w+\.", text,
                                             re.S).groups()
            answer = bytes_tokens.decode([t for t in target if t >= 0])
            assert answer == f"\nAnswer: {answer_of(facts_in(context), question)}."
            counted = [i for i, t in enumerate(target) if t >= 0]  # the answer's tokens, predicted one step early
            assert counted == list(range(len(row) - len(answer) - 1, len(row) - 1))
    with pytest.raises(ValueError):
        BabilongTask(bytes_tokens, seq_len=task.min_len - 1, sentences=BACKGROUND)


def save_random_model(path, task):
    """A checkpoint of random weights in byte tokens, trained (it says) on task at T = 16."""
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=257, d_model=16, n_layer=1, mixer="mamba2", d_state=8, headdim=8,
                           chunk_size=16))
    save_checkpoint(path, model_payload(model, args={"seq_len": 16, "init": "zero", "task": task}, step=2,
                                        corpus={"name": "tiny", "tokenizer": "bytes"}))


def test_evaluation_scores_every_answer(tmp_path, monkeypatch):
    """An oracle in place of greedy decoding reads each prompt as a model would and answers qa1 right and qa2 with
    a wrong location: accuracy 1 and 0 at every length, so the prompts hold the context and the question and the
    answers are scored and counted where they belong."""
    import eval as evaluation
    import tasks.babilong.evaluation as babilong_eval

    save_random_model(tmp_path / "lm", "lm")
    save_random_model(tmp_path / "tuned", "babilong")
    bytes_tokens, prompts_read = get_tokenizer("bytes"), []

    def oracle(model, prompts, new_tokens, autocast, chunk):
        said = []
        for prompt in prompts:
            text = bytes_tokens.decode(prompt)
            prompts_read.append(text)
            context = text.split("<context>\n")[1].split("\n</context>")[0]
            answer = answer_of(facts_in(context), text.split("Question: ")[-1])
            wrong = next(place for place in LABELS["qa2"] if place != answer)
            said.append(bytes_tokens.encode_ordinary(f"\nAnswer: {answer if 'Where is the' not in text else wrong}."
                                                     f" More words.")[:new_tokens])
        return said

    monkeypatch.setattr(babilong_eval, "greedy_answers", oracle)
    evaluation.main(["--task", "babilong", "--ckpt", str(tmp_path / "lm"), "--ckpt", str(tmp_path / "tuned"), "--len",
                     "1500", "--num_seqs", "3", "--out", str(tmp_path / "out"), "--device", "cpu"])
    records = json.loads((tmp_path / "out" / "babilong.json").read_text())["checkpoints"]
    assert [r["prompt"] for r in records] == ["few-shot", "fine-tuned"]
    for r in records:
        assert r["lengths"] == [0, 1024] and r["accuracy"] == {"qa1": [1.0, 1.0], "qa2": [0.0, 0.0]}
        assert r["mean"] == [0.5, 0.5] and all(len(a) == 3 for a in r["answers"]["qa1"])
    assert len(prompts_read) == 2 * 2 * 2 * 3  # every sample of every task and length, once per model
    assert sum(p.startswith("I will give you context") for p in prompts_read) == 2 * 3  # few-shot qa1, lm only
    assert (tmp_path / "out" / "babilong.png").exists() and (tmp_path / "out" / "babilong.csv").exists()


def test_a_tiny_model_fine_tunes_and_is_evaluated_by_length(tiny_corpus, tmp_path, capsys):
    import eval as evaluation
    import train
    from tests.conftest import tiny_run_flags

    base, tuned = tmp_path / "base", tmp_path / "babilong"
    train.main(tiny_run_flags(tiny_corpus, base, "--max_steps", "2"))
    train.main(["--task", "babilong", "--init_from", str(base), "--seq_len", "1100", "--batch_size", "2",
                "--eval_seqs", "1", "--max_steps", "2", "--eval_interval", "2", "--device", "cpu",
                "--out_dir", str(tuned)])
    assert "python eval.py --task babilong" in capsys.readouterr().out
    saved = load_checkpoint(tuned)
    assert saved["args"]["task"] == "babilong" and saved["args"]["seq_len"] == 1100 and saved["step"] == 2
    evaluation.main(["--task", "babilong", "--ckpt", str(base), "--ckpt", str(tuned), "--len", "1024",
                     "--num_seqs", "2", "--out", str(tmp_path / "out"), "--device", "cpu"])
    records = json.loads((tmp_path / "out" / "babilong.json").read_text())["checkpoints"]
    assert [(r["prompt"], r["T"], r["lengths"]) for r in records] == [("few-shot", 16, [0, 1024]),
                                                                     ("fine-tuned", 1100, [0, 1024])]
    assert all(0 <= a <= 1 for r in records for task in r["accuracy"].values() for a in task)
    assert "BABILong accuracy" in capsys.readouterr().out


def test_evaluation_refuses_bad_input_before_writing(tmp_path):
    import eval as evaluation

    save_random_model(tmp_path / "lm", "lm")
    for extra in (["--data", str(tmp_path / "nowhere")], ["--state_stats"], ["--effrem"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluation.main(["--task", "babilong", "--ckpt", str(tmp_path / "lm"), "--len", "1024", "--out",
                             str(tmp_path / "out"), "--device", "cpu"] + extra)
        assert str(exit_info.value.code).startswith("eval.py: error:") and "\n" not in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_answers_are_read_without_a_graph(tmp_path):
    """Reading a long prompt in pieces hands the state on from piece to piece: with autograd on, every piece's
    activations would stay alive through it and memory would grow with the length."""
    import contextlib
    from types import SimpleNamespace

    import tasks.babilong.evaluation as babilong_eval

    save_random_model(tmp_path / "lm", "lm")
    model = load_model(tmp_path / "lm")
    grad_enabled = []
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    reading = SimpleNamespace(autocast=contextlib.nullcontext(), args=SimpleNamespace(chunk=64))
    bar = SimpleNamespace(update=lambda n: None)
    said = babilong_eval.answers(model, [[1] * 300, [2] * 300, [3] * 200], reading, bar)
    assert [len(s) for s in said] == [babilong_eval.ANSWER_TOKENS] * 3
    assert len(grad_enabled) > 5 and not any(grad_enabled)  # read in pieces of 64 tokens, then stepped


# ----------------------------------------------------------------------------------------------------------------
# The small-T experiment: fewer facts, the depth of the facts, a fresh model in byte tokens
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", ["early", "late"])
def test_facts_go_where_the_depth_says(depth):
    """early: every fact ends within the first span tokens; late: every fact starts within the last span tokens.
    The samples keep their exact length, their answer and bAbI's order of the facts."""
    bytes_tokens, length, span = get_tokenizer("bytes"), 3000, 400
    samples = generated_set("qa1", length, 12, bytes_tokens, sentences=BACKGROUND, facts=(2, 3), depth=depth,
                            span=span)
    for sample in samples:
        text, facts = sample["input"], facts_in(sample["input"])
        assert len(bytes_tokens.encode_ordinary(text)) == length and 2 <= len(facts) <= 3
        assert sample["target"] == answer_of(facts, sample["question"])
        ends = [offset + len(bytes_tokens.encode_ordinary(" " + fact)) for offset, fact in zip(sample["facts"], facts)]
        if depth == "early":
            assert max(ends) <= span
        else:
            assert min(sample["facts"]) >= length - span
    anywhere = generated_set("qa1", length, 12, bytes_tokens, sentences=BACKGROUND, facts=(2, 3))
    assert min(min(s["facts"]) for s in anywhere) < length - span and max(max(s["facts"]) for s in anywhere) > span


def test_number_of_facts_is_an_option():
    from tasks.babilong.task import BabilongTask

    bytes_tokens = get_tokenizer("bytes")
    single = generated_set("qa1", 0, 20, bytes_tokens, sentences=BACKGROUND, facts=(1, 1))
    assert all(len(facts_in(s["input"])) == 1 for s in single)
    few = BabilongTask(bytes_tokens, seq_len=300, babilong_tasks=("qa1",), babilong_facts=(1, 2),
                       sentences=BACKGROUND)
    assert few.min_len < BabilongTask(bytes_tokens, seq_len=1200, sentences=BACKGROUND).min_len
    inputs, _ = few.batch(4, torch.Generator().manual_seed(0))
    for row in inputs.tolist():
        assert "Where is the" not in bytes_tokens.decode(row) and 1 <= len(facts_in(bytes_tokens.decode(row))) <= 2
    for bad in ((0, 2), (3, 2), (1, 2, 3)):
        with pytest.raises(UsageError):
            generated_set("qa1", 0, 1, bytes_tokens, sentences=BACKGROUND, facts=bad)
    with pytest.raises(UsageError):  # qa2's question needs an object picked up: at least two facts
        BabilongTask(bytes_tokens, seq_len=300, babilong_tasks=("qa2",), babilong_facts=(1, 2), sentences=BACKGROUND)
    with pytest.raises(UsageError):
        generated_set("qa1", 1000, 1, bytes_tokens, sentences=BACKGROUND, depth="middle", span=10)


def test_a_fresh_model_trains_in_byte_tokens_and_is_evaluated_by_depth(tmp_path, capsys):
    import eval as evaluation
    import train

    run = tmp_path / "fresh"
    train.main(["--task", "babilong", "--tokenizer", "bytes", "--babilong_tasks", "qa1", "--babilong_facts", "1", "2",
                "--seq_len", "160", "--d_model", "16", "--n_layer", "1", "--d_state", "8", "--headdim", "8",
                "--batch_size", "2", "--eval_seqs", "1", "--max_steps", "2", "--eval_interval", "2",
                "--device", "cpu", "--out_dir", str(run)])
    saved = load_checkpoint(run)
    assert saved["args"]["babilong_facts"] == [1, 2] and saved["model_config"]["vocab_size"] == 257
    post = tmp_path / "post"
    train.main(["--task", "babilong", "--init", "state_passing", "--init_from", str(run), "--max_steps", "1",
                "--eval_interval", "1", "--device", "cpu", "--out_dir", str(post)])
    assert load_checkpoint(post)["args"]["babilong_tasks"] == ["qa1"]  # inherited from the run it starts from
    evaluation.main(["--task", "babilong", "--ckpt", str(run), "--len", "512", "--num_seqs", "2", "--depth", "late",
                     "--out", str(tmp_path / "out"), "--device", "cpu"])
    saved = json.loads((tmp_path / "out" / "babilong.json").read_text())
    assert saved["depth"] == "late" and saved["span"] == 80 and saved["tasks"] == ["qa1"]
    assert list(saved["checkpoints"][0]["accuracy"]) == ["qa1"]
    assert saved["checkpoints"][0]["lengths"] == [0, 128, 256, 512]


@pytest.mark.parametrize("flags", [["--task", "babilong", "--tokenizer", "bytes", "--init_from", "{base}"],
                                   ["--task", "copy", "--tokenizer", "bytes"],
                                   ["--task", "babilong"],
                                   ["--task", "babilong", "--tokenizer", "bytes", "--babilong_tasks", "qa7"],
                                   ["--task", "babilong", "--tokenizer", "bytes", "--passkey_filler", "varied"]])
def test_fresh_training_refuses_contradictions(tmp_path, flags):
    import train

    save_random_model(tmp_path / "base", "lm")
    flags = [f.format(base=tmp_path / "base") for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags + ["--max_steps", "1", "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    assert str(exit_info.value.code).startswith("train.py: error:") and "\n" not in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_the_depth_is_refused_where_it_cannot_apply(tmp_path):
    """--depth places the facts of generated samples: not those of a published set, nor anything but BABILong."""
    import eval as evaluation

    save_random_model(tmp_path / "lm", "lm")
    (tmp_path / "set" / "qa1").mkdir(parents=True)
    for extra in (["--task", "babilong", "--data", str(tmp_path / "set")], ["--task", "lm"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluation.main(["--ckpt", str(tmp_path / "lm"), "--len", "1024", "--depth", "late", "--out",
                             str(tmp_path / "out"), "--device", "cpu"] + extra)
        assert str(exit_info.value.code).startswith("eval.py: error:") and "--depth" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()
