"""corpora/tokenizer.py: the tokenizers a corpus can be prepared with, behind tiktoken's interface.

get_tokenizer(spec) for a --tokenizer spec: bytes, a tiktoken encoding, a Hugging Face tokenizer.json (or its folder)
or a hub model ORG/NAME (its tokenizer.json through huggingface_hub's cache). Each has encode_ordinary, decode,
n_vocab, eot_token and name; a tokenizer.json also its sha256, so that a corpus and a model can be checked to share it
(data.tokenizer_mismatch).
"""
import hashlib
import re
from pathlib import Path

import tiktoken

from corpora import DataError

EOT = "<|endoftext|>"
EOT_NAMES = (EOT, "</s>", "<eos>")  # what Hugging Face tokenizers call their end-of-text token, in order of trust


def bytes_encoding():
    """256 byte tokens plus an end-of-text token (256), as a tiktoken Encoding built in code: fully offline."""
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={EOT: 256})


class HFTokenizer:
    """A Hugging Face tokenizer.json behind the part of tiktoken's Encoding that this code uses: encode_ordinary,
    decode, n_vocab, eot_token and name (a hub name, or the file's absolute path), plus the file's sha256."""

    def __init__(self, path, name):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"tokenizer {name!r} is a Hugging Face tokenizer: pip install tokenizers") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - the Rust side reports a bad file as a plain Exception
            raise DataError(f"{path} is not a readable tokenizer.json ({str(error)[:80]})") from None
        self.path, self.name = Path(path), name
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [i for i in map(self._tokenizer.token_to_id, EOT_NAMES) if i is not None]
        if not ids:
            raise DataError(f"tokenizer {name!r} has no end-of-text token ({', '.join(EOT_NAMES)}) to separate "
                            f"documents")
        self.eot_token = ids[0]

    def encode_ordinary(self, text):
        # unlike tiktoken's, a special token spelled out in the text (say <|endoftext|>) still becomes that token
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, threads):
        # Rust tokenises the texts of one call in parallel: `threads` texts a call keeps it to that many threads.
        # encode_batch_fast, where there is one, skips the offsets of every token: much less memory.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for i in range(0, len(texts), threads)
                for e in encode(texts[i:i + threads], add_special_tokens=False)]

    def decode(self, ids):
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def is_builtin(spec):
    """bytes or a tiktoken encoding: the name alone says which tokenizer it is."""
    return spec == "bytes" or spec in tiktoken.list_encoding_names()


def get_tokenizer(spec):
    """The tokenizer a --tokenizer spec names (see the top of the file); DataError, saying what to do, if it cannot
    be had."""
    if spec == "bytes":
        return bytes_encoding()
    if is_builtin(spec):
        try:
            return tiktoken.get_encoding(spec)
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            raise DataError(f"could not load the {spec} vocabulary ({type(error).__name__}; offline?): set "
                            f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files, or use --tokenizer bytes")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{spec} holds no tokenizer.json: give a tokenizer.json or a folder holding one")
    if path.is_file():
        return HFTokenizer(path.resolve(), str(path.resolve()))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not spec.endswith(".json"):
        return HFTokenizer(_download_tokenizer(spec), spec)
    if "/" in spec or spec.endswith(".json"):
        raise DataError(f"{spec} does not exist: give a tokenizer.json or a folder holding one")
    raise DataError(f"unknown tokenizer {spec!r}: use bytes, a tiktoken encoding "
                    f"({', '.join(tiktoken.list_encoding_names())}), a tokenizer.json or a hub name (ORG/NAME)")


def _download_tokenizer(repo):
    """The tokenizer.json of a hub model, from huggingface_hub's cache or downloaded into it."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(f"tokenizer {repo!r} is on the Hugging Face hub: pip install huggingface_hub, or give the "
                        f"path of its tokenizer.json") from None
    try:
        return Path(hf_hub_download(repo, "tokenizer.json"))
    except Exception as error:  # noqa: BLE001 - offline, unknown, gated and missing files raise unrelated types
        raise DataError(f"could not get the tokenizer.json of {repo!r} from the Hugging Face hub "
                        f"({type(error).__name__}; offline, misspelt or gated?): download it elsewhere and give its "
                        f"path (--tokenizer PATH, or the folder of a model with it beside its config.json); offline, "
                        f"set HF_HUB_OFFLINE=1 not to wait for the network") from None
