"""tasks/babilong/prompts.py: BABILong's prompt and its answer check, for qa1 and qa2.

The prompt (few-shot, as the benchmark evaluates base models): an instruction, two worked examples, a post-prompt
that fixes the answer's form, then the sample's context between <context> tags and its question:

    {instruction}\\n\\n{examples}\\n\\n{post_prompt}\\n\\n<context>\\n{context}\\n</context>\\n\\nQuestion: {question}

without the first three parts (few_shot=False), what is left is the prompt of a model fine-tuned on the task; its
answer is then taught as "\\nAnswer: {target}." (answer_text). The model answers with up to ANSWER_TOKENS greedy
tokens. The check (is_correct): the answer, lower-cased, up to its first full stop (and before any "<context>" or
"<example>" it starts writing) must name the target and no other of the task's labels; labels that the question
itself names do not count. So "The most recent location of Mary is kitchen." is right for kitchen, "kitchen or
garden" is wrong, and so is "Mary is not here. She is in the kitchen.", whose first sentence names no label.

The texts of the prompts are the benchmark's own (booydar/babilong, babilong/prompts.py, April 2025), kept
character for character, missing space and typographic quotes included: scores are comparable only under the
same prompt. Their answer check also splits at "Question", but after lower-casing, where that never matches; the
check here does what theirs does.
"""
from tasks.babilong.babi import LABELS

ANSWER_TOKENS = 20  # BABILong's max_new_tokens

PROMPTS = {
    "qa1": {
        "instruction":
            "I will give you context with the facts about positions of different persons hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts. "
            "If a person was in different locations, use the latest location to answer the question.",
        "examples":
            "<example>\n"
            "Charlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. "
            "Where is Charlie?\n"
            "Answer: The most recent location of Charlie is balcony.\n"
            "</example>\n\n"
            "<example>\n"
            "Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
            "travelled to balcony. Where is Alan?\n"
            "Answer: The most recent location of Alan is shop.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: "
            "The most recent location of \u2019person\u2019 is \u2019location\u2019. Do not write anything else after "
            "that.",
    },
    "qa2": {
        "instruction":
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question."
            "You need to answer the question based only on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. "
            "If a person dropped an item in the first location and moved to the second location "
            "the item remains in the first location.",
        "examples":
            "<example>\n"
            "Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. "
            "Where is the bottle?\n"
            "Answer: The bottle is in the balcony.\n"
            "</example>\n"
            "<example>\n"
            "Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where "
            "is the screw driver?\n"
            "Answer: The screw driver is in the kitchen.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: The \u2019item\u2019 is in \u2019location\u2019. "
            "Do not write anything else after that.",
    },
}

TEMPLATE = "{instruction}\n\n{examples}\n\n{post_prompt}\n\n<context>\n{context}\n</context>\n\nQuestion: {question}"


def format_prompt(task, context, question, few_shot=True):
    """The text a model reads before it answers: TEMPLATE filled in, with the task's instruction, examples and
    post-prompt (few_shot) or without them, the context stripped and the whole stripped, as BABILong does."""
    parts = PROMPTS[task] if few_shot else dict.fromkeys(PROMPTS[task], "")
    return TEMPLATE.format(**parts, context=context.strip(), question=question).strip()


def answer_text(target):
    """What a fine-tuned model learns to write after the prompt."""
    return f"\nAnswer: {target}."


def first_sentence(output):
    """The part of an answer that is scored: lower-cased, up to the first full stop, and before any <context> or
    <example> tag (a model that goes on to write examples of its own)."""
    text = output.lower().split(".")[0]
    for tag in ("<context>", "<example>"):
        text = text.split(tag)[0]
    return text


def is_correct(task, output, target, question):
    """BABILong's rule: the target is the only label of the task in the answer's first sentence, labels named in
    the question aside. Labels are found as substrings, as theirs are."""
    labels = {label.lower() for label in LABELS[task]}
    answer, question = first_sentence(output), question.lower()
    named = {label for label in labels if label in answer and label not in question}
    return named == {target.lower()}
