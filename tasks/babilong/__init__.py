"""tasks/babilong: BABILong, bAbI's question answering hidden in long text, the paper's long-context benchmark.

Kuratov et al. 2024, "BABILong: Testing the Limits of LLMs with Long Context Reasoning-in-a-Haystack" (arXiv
2406.10149): the facts of a bAbI story ("Mary moved to the bathroom.", "John went to the hallway.") are scattered
in order through background text of a given length, and the question ("Where is Mary?") is asked after all of it.
A recurrent model must carry the few facts that matter in its fixed-size state across the whole context. Buitrago
Ruiz & Gu evaluate Mamba-2 on it from 0k to 256k tokens, few-shot and fine-tuned at 2048 tokens, with and without
state passing and TBTT.

    babi.py      bAbI's world and its tasks qa1 and qa2, stories generated from a seed
    haystack.py  facts hidden in background sentences (the standard library's docstrings offline, or any text),
                 at an exact length in tokens
    dataset.py   samples {input, question, target}: read from the published sets (the hub dataset
                 RMT-team/babilong, or a folder in its layout) or generated
    prompts.py   the benchmark's few-shot prompt and its answer check
    task.py      BabilongTask: generated fine-tuning examples of at most T tokens (train.py --task babilong)
    evaluation.py  accuracy by task and length, its table and figure (eval.py --task babilong)

    from tasks.babilong import read_set, generated_set, format_prompt, is_correct
    for sample in read_set("RMT-team/babilong", "qa1", "4k"):     # or generated_set("qa1", 4000, 100, tokenizer)
        prompt = format_prompt("qa1", sample["input"], sample["question"])
        ...                                                        # greedy answer of at most ANSWER_TOKENS tokens
        is_correct("qa1", answer, sample["target"], sample["question"])
"""
from tasks.babilong.babi import LABELS, TASKS, Story, make_story
from tasks.babilong.dataset import (HUB_DATASET, LENGTH_NAMES, generated_set, length_tokens, read_set,
                                    shortest_length)
from tasks.babilong.haystack import Haystack, background_sentences
from tasks.babilong.prompts import ANSWER_TOKENS, answer_text, format_prompt, is_correct

__all__ = ["LABELS", "TASKS", "Story", "make_story", "HUB_DATASET", "LENGTH_NAMES", "generated_set", "length_tokens",
           "read_set", "shortest_length", "Haystack", "background_sentences", "ANSWER_TOKENS", "answer_text",
           "format_prompt", "is_correct"]
