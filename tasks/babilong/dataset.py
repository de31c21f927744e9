"""tasks/babilong/dataset.py: BABILong's samples, read from its published sets or generated offline.

A sample is a dict of three strings, the fields of the published sets: input (the context: facts hidden in
background text), question, target (the answer, one of the task's labels). One evaluation reads both kinds.

The published sets: the Hugging Face dataset RMT-team/babilong, one configuration per length ("0k" ... "128k",
"1M"), one split per task ("qa1", ...), a JSON file each: data/qa1/0k.json, a list of 100 samples (its dataset
card's configs: "0k" -> split "qa1" -> data/qa1/0k.json). Lengths count thousands of GPT-2 tokens of the whole
prompt (the context takes about 300 fewer). JSON is read with the standard library, through huggingface_hub's
cache (HF_HUB_OFFLINE=1: from the cache only), or from a folder in the same layout, or from one JSON file (a list
of samples, or JSON Lines).

    read_set("RMT-team/babilong", "qa1", "4k")           100 samples, downloaded once
    read_set("babilong/", "qa2", "0k")                   babilong/data/qa2/0k.json, or babilong/qa2/0k.json
    generated_set("qa1", 1024, 100, tokenizer)           contexts of exactly 1024 tokens, from seed 0

Generated sets (babi.py's stories in haystack.py's background) are the same every time for a seed, task, length
and tokenizer (and Python version: the background is its standard library's docstrings unless sentences are
given). A generated sample also says where its facts are: "facts" (the token offsets at which they start) and
"supporting" (the indices of the facts the answer rests on), for accuracy by the depth of the fact. Their facts
can go anywhere (depth "any", as BABILong), or all within the first span tokens of the context ("early": the
question comes a long context after them, which measures memory) or the last span tokens ("late": a short
dependency after a long context, which measures whether the state that context leaves still works).
"""
import json
import random
import re
from pathlib import Path

from corpora import DataError
from runs import UsageError
from tasks.babilong.babi import FACTS, LABELS, TASKS, fact_sentences, make_story
from tasks.babilong.haystack import Haystack, background_sentences

HUB_DATASET = "RMT-team/babilong"
LENGTH_NAMES = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")
FIELDS = ("input", "question", "target")


def check_task(task):
    if task not in TASKS:
        raise UsageError(f"unknown BABILong task {task!r}: this project has {' and '.join(TASKS)}")


def length_tokens(name):
    """The nominal length of a published set's name, in tokens: 0k -> 0, 4k -> 4000, 1M -> 1000000."""
    match = re.fullmatch(r"(\d+)([kM])", name)
    if not match:
        raise UsageError(f"unknown BABILong length {name!r}: one of {', '.join(LENGTH_NAMES)}")
    return int(match[1]) * (1000 if match[2] == "k" else 1000000)


# ----------------------------------------------------------------------------------------------------------------
# The published sets
# ----------------------------------------------------------------------------------------------------------------

def read_set(source, task, length):
    """The samples of task at length (a name such as "4k") from source: a JSON file (the set itself), a folder in
    the hub's layout (FOLDER/data/TASK/LENGTH.json, or FOLDER/TASK/LENGTH.json as BABILong's generator writes
    them), or a hub dataset's name (HUB_DATASET). Raises UsageError or DataError, in one line."""
    check_task(task)
    length_tokens(length)
    path = Path(source).expanduser()
    if path.is_file():
        return check_samples(read_json(path), task, path)
    if path.is_dir():
        found = [p for p in (path / "data" / task / f"{length}.json", path / task / f"{length}.json") if p.is_file()]
        if not found:
            raise DataError(f"{source} holds neither data/{task}/{length}.json (the hub's layout) nor "
                            f"{task}/{length}.json: give a folder with the set of {task} at {length}")
        return check_samples(read_json(found[0]), task, found[0])
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not source.endswith((".json", ".jsonl")):
        path = hub_file(source, f"data/{task}/{length}.json")
        return check_samples(read_json(path), task, f"{source}: data/{task}/{length}.json")
    raise DataError(f"{source} does not exist: give a JSON file, a folder in the hub's layout or a hub dataset "
                    f"(ORG/NAME, such as {HUB_DATASET})")


def hub_file(dataset, filename):
    """The local path of a file of a hub dataset, from huggingface_hub's cache or downloaded into it."""
    try:
        from huggingface_hub import errors, hf_hub_download
    except ImportError:
        raise DataError(f"{dataset} is on the Hugging Face hub: pip install huggingface_hub, or give a folder with "
                        f"its files") from None
    offline = (f"could not get {filename} of {dataset} from the Hugging Face hub ({{}}; offline?): download it "
               f"elsewhere and give its folder; offline, HF_HUB_OFFLINE=1 reads the cache without waiting for the "
               f"network")
    try:
        return Path(hf_hub_download(dataset, filename, repo_type="dataset"))
    except errors.LocalEntryNotFoundError:  # offline and not in the cache (a kind of EntryNotFoundError: first)
        raise DataError(offline.format("not in the cache")) from None
    except errors.RepositoryNotFoundError:
        raise DataError(f"{dataset} is neither a file or folder here nor a dataset on the Hugging Face hub") from None
    except errors.EntryNotFoundError:
        raise DataError(f"the hub dataset {dataset} has no {filename}: is it in BABILong's layout (data/TASK/"
                        f"LENGTH.json)?") from None
    except errors.HFValidationError:
        raise DataError(f"{dataset} is neither a file or folder here nor a Hugging Face hub name") from None
    except OSError as error:  # the network failed
        raise DataError(offline.format(type(error).__name__)) from None


def read_json(path):
    """The records of a JSON file: a list of objects, or one object a line (JSON Lines)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DataError(f"{path} is neither JSON nor JSON Lines ({whole})") from None


def check_samples(records, task, where):
    """The records as samples (the three fields, nothing else), each checked: a dict whose input, question and
    target are strings, the target one of the task's labels. DataError naming the first record that is not."""
    if not isinstance(records, list) or not records:
        raise DataError(f"{where} is not a list of samples: BABILong's sets are lists of objects with "
                        f"{', '.join(FIELDS)}")
    labels = {label.lower() for label in LABELS[task]}
    samples = []
    for i, record in enumerate(records):
        missing = [f for f in FIELDS if f not in record] if isinstance(record, dict) else list(FIELDS)
        if missing:
            raise DataError(f"sample {i} of {where} has no {missing[0]}: each needs {', '.join(FIELDS)}")
        wrong = next((f for f in FIELDS if not isinstance(record[f], str)), None)
        if wrong:
            raise DataError(f"sample {i} of {where}: its {wrong} is a {type(record[wrong]).__name__}, not a string")
        if record["target"].strip().lower() not in labels:
            raise DataError(f"sample {i} of {where}: its target {record['target']!r} is not an answer of {task} "
                            f"({', '.join(LABELS[task])}): is it the set of another task?")
        samples.append({f: record[f] for f in FIELDS})
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Generated sets
# ----------------------------------------------------------------------------------------------------------------

DEPTHS = ("any", "early", "late")  # where the facts go in a generated context


def check_facts(task, facts):
    """facts = (fewest, most) facts a story of task may have, or None (bAbI's own, FACTS[task]). UsageError unless
    1 <= fewest <= most (qa2: fewest 2, since its question needs an object that someone has picked up)."""
    if facts is None:
        return
    least = 2 if task == "qa2" else 1
    if len(facts) != 2 or not least <= facts[0] <= facts[1]:
        raise UsageError(f"facts per {task} story: give two numbers, the fewest and the most, with {least} <= fewest "
                         f"<= most (not {' '.join(map(str, facts))})")


def fact_region(depth, length, span, fact_tokens):
    """Where the facts go (Haystack.hide's within) in a context of length tokens, for depth: any (anywhere, as
    BABILong), early (in the first span tokens: the question comes after a long context, a test of memory) or late
    (in the last span tokens: a short dependency after a long context, a test of robustness to what came before)."""
    if depth not in DEPTHS:
        raise UsageError(f"unknown depth {depth!r}: one of {', '.join(DEPTHS)}")
    if depth == "any" or length == 0:
        return None
    if span is None or span < 1:
        raise UsageError(f"depth {depth} needs a span of at least 1 token, where the facts go")
    room = length - fact_tokens  # the background's tokens
    return (0, max(span - fact_tokens, 0)) if depth == "early" else (max(room - span + fact_tokens, 0), room)


def shortest_length(task, tokenizer, facts=None):
    """The fewest tokens that hold any story of task: its most facts, each as long as the longest fact can be,
    and one token of background."""
    most = (facts or FACTS[task])[1]
    return most * max(len(tokenizer.encode_ordinary(" " + s)) for s in fact_sentences(task)) + 1


def generated_set(task, length, count, tokenizer, seed=0, sentences=None, facts=None, depth="any", span=None):
    """count samples of task with contexts of exactly length tokens (0: the facts alone), the same for the same
    arguments. sentences: the background (default: background_sentences()); facts: (fewest, most) facts a story;
    depth, span: where the facts go (fact_region: any, or within the first or last span tokens)."""
    check_task(task)
    check_facts(task, facts)
    fact_region(depth, length, span, 0)  # refuse a bad depth before any work
    shortest = shortest_length(task, tokenizer, facts)
    if 0 < length < shortest:
        raise UsageError(f"a context of {length} tokens is too short to hold the facts of {task} (up to {shortest - 1} "
                         f"tokens) and background text: give at least {shortest} tokens, or 0 for the facts alone")
    haystack = Haystack(tokenizer, background_sentences() if sentences is None else sentences)
    rng = random.Random(f"babilong {task} {length} {seed}")  # a string seeds the same sequence everywhere
    samples = []
    for _ in range(count):
        story = make_story(task, rng, facts)
        fact_tokens = sum(haystack.count(" " + f) for f in story.facts)
        text, offsets = haystack.hide(story.facts, length, rng, fact_region(depth, length, span, fact_tokens))
        samples.append({"input": text, "question": story.question, "target": story.target, "facts": offsets,
                        "supporting": list(story.supporting)})
    return samples
