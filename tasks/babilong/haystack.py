"""tasks/babilong/haystack.py: facts hidden in background text of an exact length in tokens, as BABILong builds
its samples.

BABILong takes consecutive sentences of a PG-19 book from a random place, as many as fill the sample's length, and
puts the facts between them at random places, in their order; the last sentence is cut to make the length exact.
Offline, and on every machine, the background here is English prose that the Python standard library carries: the
sentences of its docstrings, in file order (about 6,000, some 100k GPT-2 tokens; longer samples go round them
again), or the sentences of text files you give (PG-19's books, say). Sentences that name a person, location or
object of bAbI's world are left out, so that only the facts tell where things are.

    haystack = Haystack(tokenizer, background_sentences())      # or background_sentences("pg19_test/")
    text, offsets = haystack.hide(facts, length, rng)
    len(tokenizer.encode_ordinary(text)) == length              # offsets: where each fact's tokens start

Exact lengths. A byte-level BPE (GPT-2's tiktoken encoding, the GPT-NeoX tokenizer.json of the official Mamba
checkpoints) splits text into pieces before merging, and a space followed by a word always starts a new piece. So
pieces joined by single spaces take exactly the sum of their own token counts, each counted with its leading space
(the first without): the counts of the sentences are computed once, the background is filled with whole sentences,
and the gap left is filled with the first words of another sentence whose count is exactly the gap (the last word
cut after one of its tokens if need be, when its text encodes back to the same tokens). The facts go after the
first background sentence, so that the text always starts with the same, counted piece. The finished text is
encoded once more to check the count, so a tokenizer that splits otherwise is refused rather than miscounted.
"""
import functools
import itertools
import re
import sysconfig
from pathlib import Path

from corpora import DataError
from tasks.babilong.babi import WORLD_WORDS

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")  # where one sentence of a paragraph ends and the next starts
PROSE = re.compile(r"[A-Z][a-z]+(?:[ ,;'-]+[A-Za-z]+)+[a-z]\.")  # plain words ending in a full stop: no code, no
PROSE_WORDS = (6, 40)  # abbreviations; sentences of 6 to 40 words (BABILong keeps sentences of 10 tokens or more)
TRIPLE_QUOTED = re.compile(r'"""(.*?)"""', re.S)  # docstrings, found without parsing (ast would take 5x longer)


def sentences_of(text):
    """The prose sentences of text: split into paragraphs at blank lines, each into sentences; kept when PROSE
    matches and they name nothing of bAbI's world.  Returns a list of str, in order."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
            words = sentence.split(" ")
            if PROSE.fullmatch(sentence) and PROSE_WORDS[0] <= len(words) <= PROSE_WORDS[1] and \
                    not WORLD_WORDS.intersection(re.findall(r"[a-z]+", sentence.lower())):
                kept.append(sentence)
    return kept


@functools.lru_cache(maxsize=1)
def stdlib_sentences():
    """The sentences of the standard library's docstrings (site-packages and tests left out), file by file in
    sorted order: about a second to read. They differ between Python versions, and so do generated samples."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    sentences = []
    for path in sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)):
        for docstring in TRIPLE_QUOTED.findall(path.read_text(encoding="utf-8", errors="replace")):
            sentences += sentences_of(docstring)
    return tuple(sentences)


def background_sentences(source=None):
    """The background: the standard library's docstrings (source None), or the prose sentences of a text file or
    of the *.txt files under a folder (sorted). DataError when there is nothing to read."""
    if source is None:
        return stdlib_sentences()
    path = Path(source).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path] if path.is_file() else None
    if files is None:
        raise DataError(f"background text {source} does not exist: give a text file or a folder of .txt files")
    sentences = [s for f in files for s in sentences_of(f.read_text(encoding="utf-8", errors="replace"))]
    if len(sentences) < 2:
        raise DataError(f"background text {source} has {len(sentences)} prose sentences (plain words ending in a "
                        f"full stop, none naming bAbI's persons, locations or objects): give more text")
    return tuple(sentences)


class Haystack:
    """Background sentences and their token counts in one tokenizer (anything with encode_ordinary)."""

    def __init__(self, tokenizer, sentences):
        self.tokenizer, self.sentences = tokenizer, tuple(sentences)
        self.spaced = [self.count(" " + s) for s in self.sentences]  # a sentence's tokens after a space

    def count(self, text):
        return len(self.tokenizer.encode_ordinary(text))

    def hide(self, facts, length, rng, within=None):
        """text of exactly length tokens: background sentences from a random place in order, the facts (strings)
        between them in order at random places, never before the first. length 0: the facts alone, as BABILong's
        0k. within: (lo, hi), to put the facts only between sentences that lie lo to hi tokens into the background
        (the nearest such place when none does), for the depth of the fact; None: anywhere. Returns (text,
        offsets): offsets[i], the token at which fact i starts. ValueError when the facts leave no room for
        background text."""
        spaced_facts = [self.count(" " + f) for f in facts]
        if length == 0:
            first = self.count(facts[0]) - spaced_facts[0] if facts else 0  # the first fact has no leading space
            return " ".join(facts), [sum(spaced_facts[:i]) + first * (i > 0) for i in range(len(facts))]
        room = length - sum(spaced_facts)
        if room < 1:
            raise ValueError(f"{length} tokens cannot hold these {len(facts)} facts ({sum(spaced_facts)} tokens) "
                             f"and background text")
        background, costs = self._fill(room, rng.randrange(len(self.sentences)))
        places = self._places(costs, within)
        slots = sorted(rng.choice(places) for _ in facts)  # fact i goes before background[slots[i]]
        pieces = background[:]
        for i, slot in reversed(list(enumerate(slots))):
            pieces.insert(slot, facts[i])
        text = " ".join(pieces)
        if self.count(text) != length:
            raise DataError(f"tokenizer {getattr(self.tokenizer, 'name', '?')} does not split text at spaces as "
                            f"byte-level BPE does, so samples of an exact length cannot be built with it")
        return text, self._offsets(costs, slots, spaced_facts)

    @staticmethod
    def _places(costs, within):
        """Where facts may go: the indices b (1 .. len(costs)) of the background pieces they may precede (b =
        len(costs): after the last), those whose background tokens before them, sum(costs[:b]), lie in within =
        (lo, hi); the nearest one when none does."""
        before = list(itertools.accumulate(costs))  # before[b - 1]: background tokens ahead of place b
        places = list(range(1, len(costs) + 1))
        if within is None:
            return places
        lo, hi = within
        inside = [b for b in places if lo <= before[b - 1] <= hi]
        return inside or [min(places, key=lambda b: min(abs(before[b - 1] - lo), abs(before[b - 1] - hi)))]

    def _fill(self, room, start):
        """Background pieces taking exactly room tokens: whole sentences from start on (round the list again when
        it ends), then the first words of a later sentence for the gap left (fewer whole sentences when no words
        fill it).  Returns (pieces, their costs)."""
        pieces, costs, used, i = [], [], 0, start
        while True:
            sentence = self.sentences[i % len(self.sentences)]
            cost = self.spaced[i % len(self.sentences)] if pieces else self.count(sentence)
            if used + cost > room:
                break
            pieces.append(sentence)
            costs.append(cost)
            used, i = used + cost, i + 1
        while used < room:
            words = self._words_taking(room - used, i, first=not pieces)
            if words is not None:
                pieces.append(words)
                costs.append(room - used)
                used = room
            elif pieces:  # no words fill so small a gap (a space is a token of its own in bytes): widen it
                pieces.pop()
                used, i = used - costs.pop(), i - 1
            else:
                raise DataError(f"no sentence of the background text starts with words of exactly {room} tokens: "
                                f"give more background text")
        return pieces, costs

    def _words_taking(self, gap, start, first):
        """The first words of one of the sentences from start on that take exactly gap tokens (each word counted
        with its leading space, but for the text's first word when first), the last word cut after a token when
        whole words skip over the gap, as BABILong cuts its last sentence. None when no sentence has them."""
        for i in range(start, start + len(self.sentences)):
            spaced, taken = "", 0
            for k, word in enumerate(self.sentences[i % len(self.sentences)].split(" ")):
                piece = word if first and k == 0 else " " + word
                ids = self.tokenizer.encode_ordinary(piece)
                if taken + len(ids) >= gap:
                    cut = piece if taken + len(ids) == gap else self._stable_text(ids[:gap - taken])
                    if cut is not None:
                        return (spaced + cut)[0 if first else 1:]  # the caller puts a space before it
                    break
                spaced, taken = spaced + piece, taken + len(ids)
        return None

    def _stable_text(self, ids):
        """The text of ids (the first tokens of a word) when it is encoded back to the same ids and ends in no
        space; else None."""
        text = self.tokenizer.decode(ids)
        return text if text.strip() and not text[-1].isspace() and self.tokenizer.encode_ordinary(text) == ids \
            else None

    @staticmethod
    def _offsets(costs, slots, spaced_facts):
        """Where each fact's tokens start in the text: the tokens of the background pieces and of the facts before
        it (a fact's leading space is part of its first token)."""
        return [sum(costs[:slot]) + sum(spaced_facts[:i]) for i, slot in enumerate(slots)]
