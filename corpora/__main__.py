"""python -m corpora: prepare a corpus from the command line (corpora/__init__.py says what one is).

    python -m corpora                             the default corpus, in byte tokens, into data/stdlib/
    python -m corpora --input PATH [--name NAME] [--tokenizer gpt2]
                                                  a text file, a folder of text files (recursive), or .jsonl /
                                                  .jsonl.gz / .jsonl.zst with a "text" field, a document a line
"""
if __name__ == "__main__":  # a Ctrl-C while the imports below load ends quietly, not with a traceback
    import signal
    import sys
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import runs
from corpora import DATA_DIR
from corpora.prepare import VAL_FRACTION, prepare

FLAGS = [  # (name, type, help, choices)
    ("input", str, "a text file, a folder of text files, or .jsonl/.jsonl.gz/.jsonl.zst with a 'text' field "
                   "(default: the Python standard library's source)", None),
    ("name", str, "corpus name, one folder name under --data_dir, replaced only if it holds a corpus (default: from "
                  "input and tokenizer)", None),
    ("tokenizer", str, "bytes (the default), a tiktoken encoding (gpt2), a Hugging Face tokenizer.json (or its "
                       "folder) or a hub name (EleutherAI/gpt-neox-20b)", None),
    ("val_fraction", float, f"share of documents (of a single file's tokens) for validation (default {VAL_FRACTION})",
     None),
    ("workers", int, "tokenising threads, at most 256 (default: all cores, at most 8)", None),
    ("data_dir", str, f"where corpora live (default: {DATA_DIR})", None),
]


def main(argv=None):
    runs.one_line("python -m corpora", lambda argv: prepare(**runs.parse("python -m corpora", __doc__, argv, {
        "preparing a corpus": FLAGS})), argv)


if __name__ == "__main__":
    main()
