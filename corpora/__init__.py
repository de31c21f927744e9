"""corpora: preparing corpora, the side of the data that writes (data.py reads what is prepared here).

    python -m corpora                             the default corpus, in byte tokens, into data/stdlib/
    python -m corpora --input PATH [--name NAME] [--tokenizer gpt2]
                                                  a text file, a folder of text files (recursive), or .jsonl /
                                                  .jsonl.gz / .jsonl.zst with a "text" field, a document a line

    corpora/tokenizer.py   get_tokenizer(spec): bytes (the UTF-8 bytes as 256 tokens plus an end-of-text token, so
                           that a small model trains fast on a CPU), a tiktoken encoding (gpt2, cl100k_base, ...), a
                           Hugging Face tokenizer.json (or its folder), or a hub model ORG/NAME such as
                           EleutherAI/gpt-neox-20b, the official Mamba checkpoints' (through huggingface_hub's cache;
                           with HF_HUB_OFFLINE=1 it never waits for the network)
    corpora/prepare.py     prepare(): documents read, tokenised and written as a corpus, safely
    corpora/__main__.py    the command line above

A corpus is data/NAME/train.bin and val.bin, every document's tokens followed by end-of-text (uint16, or uint32 for a
larger vocabulary), and meta.json: the tokenizer (and the sha256 of a tokenizer.json), the counts, what could not be
used (or was read as U+FFFD), and "created", a stamp per preparation (data.Corpus.fingerprint). Those three files are
how a corpus is known: a folder holding anything else is never replaced or removed. The default corpus is the Python
standard library's own .py files (site-packages excluded, about 30 MB): real text with long-range structure that every
Python installation carries, so that everything works offline; data.load_corpus prepares it on first use.
"""
import sys

if sys.argv[:1] == ["-m"]:  # python -m corpora: Python imports this package (torch too, through runs) before it
    import signal          # runs __main__.py; a Ctrl-C meanwhile ends quietly too, not with a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

from pathlib import Path  # noqa: E402

from runs import UsageError  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # where corpora live: data/ in the repository
DEFAULT_CORPUS = "stdlib"


class DataError(UsageError):
    """A problem with the user's data or options, told in one line that says what to do."""
