"""data.py: corpora as flat token files, and the batches that training and evaluation read from them.

    python data.py                                  the default corpus (below), byte tokens, into data/stdlib/
    python data.py --input PATH [--name NAME] [--tokenizer gpt2]
                                                    a text file, a folder of text files (recursive), or .jsonl /
                                                    .jsonl.gz / .jsonl.zst with a "text" field, one document per
                                                    line (the Pile's files are .jsonl.zst: read as a stream)

The default corpus is the Python standard library's own source code: every .py file under the running
interpreter's stdlib folder (site-packages excluded), one document per file, about 30 MB. Every Python installation
carries it, so it works offline on any machine, and it is real text that nobody here wrote, with long documents and
long-range structure (imports, names defined far above their use).

Tokenizers (--tokenizer), tried in this order:
    bytes                    the default: 256 byte tokens plus an end-of-text token, which keeps the embedding and
                             the softmax tiny, so a small model trains fast on a laptop CPU
    gpt2, cl100k_base, ...   any tiktoken encoding; tiktoken downloads and caches it on first use
    PATH                     a Hugging Face tokenizer.json, or a folder holding one
    ORG/NAME                 a Hugging Face hub model whose tokenizer.json is downloaded (and cached) with
                             huggingface_hub, e.g. EleutherAI/gpt-neox-20b, the tokenizer of the official Mamba-2
                             checkpoints
meta.json records the tokenizer (a hub name, or the absolute path of a local tokenizer.json) and, for Hugging Face
tokenizers, the sha256 of its tokenizer.json: tokenizer_mismatch() compares that record with a model's.

Each document is followed by the end-of-text token; documents go to train or val by a hash of their name (10% val),
so the split is deterministic and no document is in both. A single text file is one document; then the last 10% of
its tokens are the validation split. Output, written under a temporary name and renamed when complete:
data/NAME/train.bin and val.bin (uint16 when the vocabulary fits, else uint32) and meta.json. NAME is one plain
folder name. A corpus that is replaced waits as data/.NAME.old until the new one is in place, and comes back if
anything goes wrong, even after a hard kill (on the next use). meta.json's "created" is a unique stamp written once
per preparation: Corpus.fingerprint, which lets a resumed training run notice that its corpus was prepared again.

Batches (torch int64 tensors):
    Corpus.random_windows(split, B, T)   (B, T + 1) windows at random offsets: inputs [:, :-1], targets [:, 1:]
    StreamBatcher                        (B, T + 1) windows where row i continues exactly where it stopped in the
                                         previous batch: truncated backpropagation through time
    Corpus.eval_sequences(length, n)     (n, length + 1) fixed, evenly spaced sequences of the validation split,
                                         and their start offsets
"""
import argparse
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CORPUS = "stdlib"
EOT = "<|endoftext|>"
EOT_NAMES = (EOT, "</s>", "<eos>")  # what Hugging Face tokenizers call their end-of-text token, in order of trust
JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")
VAL_FRACTION = 0.1
PARALLEL_ABOVE_BYTES = 16 * 2 ** 20  # inputs larger than this are tokenised by a pool of processes


class DataError(Exception):
    """A problem with the user's data or options, told in one line that says what to do."""


def check_name(name):
    """A corpus name is one plain folder name under data_dir, so that no name can reach (and replace) a folder
    elsewhere; a leading dot is kept for the temporary and replaced folders."""
    if not name or name.startswith(".") or Path(name).name != name or any(c in name for c in "\\\0"):
        raise DataError(f"corpus name {name!r} is not a plain folder name: use letters, digits, '-', '_' or '.', "
                        f"without '/' and not starting with '.'")
    return name


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------

def bytes_encoding():
    """256 byte tokens plus an end-of-text token (256), as a tiktoken Encoding built in code: fully offline."""
    import tiktoken

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
            raise DataError(f"{path} is not a readable tokenizer.json ({str(error)[:80]}): give the tokenizer.json "
                            f"of a Hugging Face model") from None
        self.path, self.name = Path(path), name
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [self._tokenizer.token_to_id(token) for token in EOT_NAMES]
        if all(i is None for i in ids):
            raise DataError(f"tokenizer {name!r} has no end-of-text token ({', '.join(EOT_NAMES)}): documents "
                            f"could not be separated; use a tokenizer that has one")
        self.eot_token = next(i for i in ids if i is not None)

    def encode_ordinary(self, text):
        # unlike tiktoken's encode_ordinary, a special token spelled out in the text (say <|endoftext|>) still
        # becomes that token
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _is_builtin(spec):
    """bytes or a tiktoken encoding: the name alone says which tokenizer it is."""
    import tiktoken

    return spec == "bytes" or spec in tiktoken.list_encoding_names()


def get_tokenizer(spec):
    """'bytes', a tiktoken encoding name, a tokenizer.json (or a folder holding one), or a Hugging Face hub name
    (ORG/NAME).  Raises DataError with what to do when it cannot be had."""
    import tiktoken

    if spec == "bytes":
        return bytes_encoding()
    if _is_builtin(spec):
        try:
            return tiktoken.get_encoding(spec)
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            raise DataError(f"could not load the {spec} vocabulary ({type(error).__name__}; offline?): set "
                            f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files, or use --tokenizer bytes")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{spec} holds no tokenizer.json: give a tokenizer.json file or a folder holding one")
    if path.is_file():
        return HFTokenizer(path.resolve(), str(path.resolve()))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not spec.endswith(".json"):
        return HFTokenizer(_download_tokenizer(spec), spec)
    if "/" in spec or spec.endswith(".json"):
        raise DataError(f"{spec} does not exist: give a tokenizer.json file or a folder holding one")
    raise DataError(f"unknown tokenizer {spec!r}: use bytes, one of tiktoken's "
                    f"({', '.join(tiktoken.list_encoding_names())}), a tokenizer.json path or a Hugging Face hub "
                    f"name (ORG/NAME)")


def _download_tokenizer(repo):
    """The tokenizer.json of a hub model, from huggingface_hub's cache or downloaded into it."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(f"tokenizer {repo!r} comes from the Hugging Face hub: pip install huggingface_hub, or pass "
                        f"the path of its tokenizer.json") from None
    try:
        return Path(hf_hub_download(repo, "tokenizer.json"))
    except Exception as error:  # noqa: BLE001 - offline, unknown, gated and missing files raise unrelated types
        raise DataError(f"could not get tokenizer.json of {repo!r} from the Hugging Face hub ({type(error).__name__}; "
                        f"offline, misspelt or gated?): download it elsewhere and pass its path instead (data.py "
                        f"--tokenizer PATH; for a model, put it beside the model's config.json and pass that folder)"
                        ) from None


def tokenizer_identity(meta_or_spec):
    """{"tokenizer": name, "tokenizer_sha256": sha256 of its tokenizer.json, or None for bytes and tiktoken}, from
    a corpus's meta.json (or any dict with those keys; missing keys are None) or from a --tokenizer spec."""
    if isinstance(meta_or_spec, str):
        if _is_builtin(meta_or_spec):
            return {"tokenizer": meta_or_spec, "tokenizer_sha256": None}
        enc = get_tokenizer(meta_or_spec)
        return {"tokenizer": enc.name, "tokenizer_sha256": enc.sha256}
    meta = meta_or_spec or {}
    return {"tokenizer": meta.get("tokenizer"), "tokenizer_sha256": meta.get("tokenizer_sha256")}


def tokenizer_mismatch(corpus_meta, model_tokenizer):
    """None when a corpus (its meta.json) and a model (tokenizer_identity() of what it was trained with) use the
    same tokenizer, else why not, in a few words.  The tokenizer.json's sha256 decides when both sides have one
    (a hub name and a local copy of its file agree); otherwise the names do. A model whose tokenizer is unknown
    (None) is taken to match."""
    corpus, model = tokenizer_identity(corpus_meta), tokenizer_identity(model_tokenizer)
    if corpus["tokenizer_sha256"] and model["tokenizer_sha256"]:
        if corpus["tokenizer_sha256"] == model["tokenizer_sha256"]:
            return None
        return (f"the corpus was tokenised by {corpus['tokenizer']} (tokenizer.json sha256 "
                f"{corpus['tokenizer_sha256'][:12]}), the model by {model['tokenizer']} (sha256 "
                f"{model['tokenizer_sha256'][:12]})")
    if model["tokenizer"] is None or corpus["tokenizer"] == model["tokenizer"]:
        return None
    return f"the corpus was tokenised by {corpus['tokenizer']}, the model by {model['tokenizer']}"


def _tokenizer_label(enc):
    """The part of a default corpus name that says which tokenizer made it ('' for bytes)."""
    if isinstance(enc, HFTokenizer):
        path = Path(enc.name)
        label = path.parent.name if path.name == "tokenizer.json" else path.name.removesuffix(".json")
        return re.sub(r"[^\w.-]", "_", label).lstrip(".") or "tokenizer"
    return "" if enc.name == "bytes" else enc.name


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


# ----------------------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------------------

def stdlib_folder():
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(path):
    """The files a --input path stands for: itself, or every non-hidden file below a folder, sorted."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: give a text file, a folder of text files or a .jsonl(.gz/.zst) file")
    if path.is_file():
        return [path]
    files = [f for f in sorted(path.rglob("*"))
             if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)]
    if not files:
        raise DataError(f"{path} holds no files")
    return files


def read_documents(files, root, skipped):
    """Yield (key, text) for every document; key names the document for the split. Files that cannot be read
    or are not UTF-8, and jsonl lines without a "text" string, are counted in skipped['files'/'lines']."""
    for f in files:
        key = f.relative_to(root).as_posix() if root.is_dir() else f.name
        if f.name.endswith(JSONL):
            yield from _read_jsonl(f, key, skipped)
            continue
        try:
            yield key, f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped["files"] += 1


def _read_jsonl(f, key, skipped):
    damaged = (OSError, UnicodeDecodeError, EOFError) + ((_zstandard().ZstdError,) if f.name.endswith(".zst") else ())
    try:
        with _open_text(f) as lines:
            for number, line in enumerate(lines):
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    skipped["lines"] += 1
                    continue
                yield f"{key}:{number}", text
    except damaged:
        skipped["files"] += 1


def _open_text(f):
    """A text file, decompressed as it is read when it ends in .gz or .zst: a large file is never held whole."""
    if f.name.endswith(".zst"):
        reader = _zstandard().ZstdDecompressor().stream_reader(open(f, "rb"), read_across_frames=True)
        return io.TextIOWrapper(reader, encoding="utf-8")
    return (gzip.open if f.name.endswith(".gz") else open)(f, "rt", encoding="utf-8")


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise DataError("reading .zst files needs the zstandard package: pip install zstandard") from None
    return zstandard


def is_validation(key, val_fraction):
    """A stable, machine-independent coin flip per document name."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 10_000 < val_fraction * 10_000


# ----------------------------------------------------------------------------------------------------------------
# Preparing a corpus
# ----------------------------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _load_tokenizer(spec):
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(spec)


def _init_pool_worker(spec):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which ends the whole pool at once
    _load_tokenizer(spec)


def _encode_batch(texts):
    return [_worker_tokenizer.encode_ordinary(text) for text in texts]


def _batches(documents, size=64):
    batch = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(documents, tokenizer_spec, workers):
    """Yield (key, tokens, characters) in document order, tokenised by a pool of processes when workers > 1.
    Closing the generator early (an error or Ctrl-C in the caller) terminates the pool."""
    if workers <= 1:
        _load_tokenizer(tokenizer_spec)
        for key, text in documents:
            yield key, _worker_tokenizer.encode_ordinary(text), len(text)
        return
    batches = _batches(documents)
    with multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=(tokenizer_spec,)) as pool:
        pending = ((batch, pool.apply_async(_encode_batch, ([text for _, text in batch],))) for batch in batches)
        window = []  # a few batches in flight keep every worker busy while order is preserved
        for item in pending:
            window.append(item)
            if len(window) > 2 * workers:
                yield from _finished(window.pop(0))
        for item in window:
            yield from _finished(item)


def _finished(item):
    batch, result = item
    for (key, text), tokens in zip(batch, result.get()):
        yield key, tokens, len(text)


def prepare(input=None, name=None, tokenizer="bytes", data_dir=DATA_DIR, val_fraction=VAL_FRACTION, workers=None):
    """Tokenise a corpus into data_dir/NAME/{train.bin, val.bin, meta.json}.  Returns the corpus folder.

    input None means the default corpus (the Python standard library's source); name None means one made from the
    input's and the tokenizer's names. Raises DataError on bad input, before anything is written.
    """
    if name is not None:
        check_name(name)
    enc = get_tokenizer(tokenizer)  # fail early on an unknown or unavailable tokenizer
    if input is None:
        root = stdlib_folder()
        files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)
        source = f"Python {sys.version.split()[0]} standard library ({root}), *.py, site-packages excluded"
        base = DEFAULT_CORPUS
    else:
        root = Path(input).resolve()
        files = list_sources(root)
        source = str(root)
        base = root.name.split(".")[0] or "corpus"
    name = check_name(name if name is not None else "-".join(filter(None, (base, _tokenizer_label(enc)))))
    if any(f.name.endswith(".zst") for f in files):
        _zstandard()  # missing: say so now rather than skip every file
    single_document = root.is_file() and not root.name.endswith(JSONL)
    total_bytes = sum(f.stat().st_size for f in files)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total_bytes > PARALLEL_ABOVE_BYTES else 1

    work, final = _make_work_folder(Path(data_dir), name), Path(data_dir) / name
    try:
        meta = _write_splits(files, root, enc, workers, val_fraction, single_document, work, total_bytes)
        meta.update(name=name, source=source, val_fraction=val_fraction, split_rule=(
            f"single document: the last {val_fraction:.0%} of its tokens are validation" if single_document else
            f"by document: md5(document name) decides, {val_fraction:.0%} validation"),
            created=f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}-{uuid.uuid4().hex[:16]}")
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _swap_in(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def _make_work_folder(data_dir, name):
    """An empty folder beside data_dir/name to write into, with the permissions of a folder made by hand."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        _recover(data_dir / name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=data_dir))
    except OSError as error:
        raise DataError(f"cannot write under {data_dir} ({error.strerror or error}): give a writable folder as "
                        f"--data_dir") from None
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp's 700 would hide the corpus from the other users of a shared machine
    return work


def _swap_in(work, final):
    """Rename work to final. A corpus already there is moved aside first, and moved back if anything fails before
    the new one is in place; only then is it deleted."""
    old = final.parent / f".{final.name}.old"
    try:
        if final.exists():
            final.rename(old)
        work.rename(final)
    except BaseException:
        _recover(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _recover(final):
    """Finish a replacement that was cut short: .NAME.old is the corpus when NAME is missing, else a leftover."""
    old = final.parent / f".{final.name}.old"
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.rename(final)


def _write_splits(files, root, enc, workers, val_fraction, single_document, work, total_bytes):
    """Stream tokens of every document into work/train.bin or work/val.bin.  Returns the counting part of meta."""
    dtype = token_dtype(enc.n_vocab)
    counts = {split: {"documents": 0, "tokens": 0} for split in ("train", "val")}
    skipped = {"files": 0, "lines": 0}
    outputs = {split: open(work / f"{split}.bin", "wb") for split in counts}
    # the workers rebuild the tokenizer from this: the file itself for a Hugging Face one, never the hub again
    encoded = _encoded(read_documents(files, root, skipped), str(getattr(enc, "path", enc.name)), workers)
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenising ({enc.name})") as bar:
            for key, tokens, characters in encoded:
                tokens = np.asarray(tokens + [enc.eot_token], dtype=dtype)
                if single_document:
                    cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
                    parts = {"train": tokens[:cut], "val": tokens[cut:]}
                else:
                    parts = {"val" if is_validation(key, val_fraction) else "train": tokens}
                for split, part in parts.items():
                    part.tofile(outputs[split])
                    counts[split]["documents"] += 1
                    counts[split]["tokens"] += len(part)
                bar.update(characters)
    finally:
        encoded.close()  # ends the pool now, not whenever the generator is garbage-collected
        for f in outputs.values():
            f.close()
    if counts["train"]["documents"] + counts["val"]["documents"] == 0:
        raise DataError(f"no documents found in {root} ({skipped['files']} files skipped as unreadable or not "
                        f"UTF-8, {skipped['lines']} jsonl lines without a \"text\" string)")
    for split in counts:
        if counts[split]["tokens"] == 0:
            raise DataError(f"the {split} split of {root} is empty: give more documents or change --val_fraction")
    return {"tokenizer": enc.name, "tokenizer_sha256": getattr(enc, "sha256", None), "vocab_size": enc.n_vocab,
            "eot_token": enc.eot_token, "dtype": np.dtype(dtype).name, "splits": counts, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------------
# Reading a prepared corpus
# ----------------------------------------------------------------------------------------------------------------

class Corpus:
    """A prepared corpus: memory-mapped token files and the batches drawn from them."""

    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            dtype = np.dtype(self.meta["dtype"])
            self.vocab_size = int(self.meta["vocab_size"])
            self.meta["tokenizer"], self.meta["eot_token"]  # noqa: B018 - read later; a missing one is named now
        except KeyError as error:
            raise DataError(f"{self.folder}/meta.json has no {error}: prepare the corpus again (python data.py)") \
                from None
        except (OSError, ValueError, TypeError):
            raise DataError(f"{self.folder} is not a prepared corpus (no readable meta.json): run python data.py") \
                from None
        self.name = self.meta.get("name", self.folder.name)
        files = {split: self.folder / f"{split}.bin" for split in ("train", "val")}
        sizes = {split: f.stat().st_size if f.is_file() else 0 for split, f in files.items()}
        for split, size in sizes.items():
            _require(size > 0 and size % dtype.itemsize == 0, f"{files[split]} is missing, empty or cut short: "
                     f"prepare the corpus again (python data.py)")
        # a stamp per preparation; corpora prepared before there was one are told apart by their sizes
        self.fingerprint = str(self.meta.get("created") or f"sizes-{sizes['train']}-{sizes['val']}")
        self._splits = {split: np.memmap(f, dtype=dtype, mode="r") for split, f in files.items()}

    def tokens(self, split):
        """The whole split as a 1-D memory-mapped array."""
        return self._splits[split]

    def tokenizer(self):
        """The tokenizer that made this corpus; refused when its tokenizer.json has changed since."""
        enc, recorded = get_tokenizer(self.meta["tokenizer"]), self.meta.get("tokenizer_sha256")
        if recorded not in (None, getattr(enc, "sha256", None)):
            raise DataError(f"{self.meta['tokenizer']} is not the tokenizer.json that prepared corpus '{self.name}' "
                            f"(its sha256 was {recorded[:12]}...): prepare the corpus again, or put that file back")
        return enc

    def random_windows(self, split, batch_size, length, generator=None):
        """(B, length + 1) int64 windows at uniformly random offsets of a split."""
        tokens = self._splits[split]
        _require(len(tokens) >= length + 2, f"the {split} split of '{self.name}' has {len(tokens):,} tokens, fewer "
                 f"than one window of {length + 1:,}: lower --seq_len or prepare a larger corpus")
        starts = torch.randint(0, len(tokens) - length - 1, (batch_size,), generator=generator)
        return torch.stack([_window(tokens, int(s), length + 1) for s in starts])

    def eval_sequences(self, length, num_seqs, split="val", flags=("--num_seqs", "--len")):
        """(num_seqs, length + 1) int64: the same sequences on every call and machine for a given corpus.

        The split is cut into num_seqs equal stretches; each sequence starts at the first document start of its
        stretch (or at the stretch's start if that leaves no room), so sequences never overlap.
        Returns the sequences and their start offsets (for the record). flags names the caller's options for the
        number and the length of sequences, for the error message.
        """
        tokens = self._splits[split]
        need = num_seqs * (length + 1)
        _require(len(tokens) >= need, f"the {split} split of '{self.name}' has {len(tokens):,} tokens, but {num_seqs} "
                 f"sequences of {length + 1:,} tokens need {need:,}: lower {flags[0]} or {flags[1]}, or prepare a "
                 f"larger corpus (python data.py --input PATH)")
        stretch = len(tokens) // num_seqs
        starts = []
        for i in range(num_seqs):
            lo, room = i * stretch, stretch - (length + 1)
            boundaries = np.flatnonzero(tokens[lo:lo + room + 1] == self.meta["eot_token"])
            starts.append(lo + int(boundaries[0]) + 1 if len(boundaries) and boundaries[0] < room else lo)
        sequences = torch.empty(num_seqs, length + 1, dtype=torch.int64)  # filled in place: one copy, not two
        for row, start in zip(sequences, starts):
            row.copy_(torch.from_numpy(tokens[start:start + length + 1].astype(np.int64)))
        return sequences, starts


class StreamBatcher:
    """Contiguous streams for truncated backpropagation through time.

    The split is cut into batch_size * world_size equal lanes; row i of this rank reads its own lane, T tokens per
    batch, so row i of batch k + 1 starts exactly where row i of batch k stopped (windows share their edge token:
    the last target of one is the first input of the next). A lane that runs out starts over; next() reports
    which rows did so, since their carried state no longer belongs to the text that follows.
    """

    def __init__(self, corpus, split, batch_size, length, rank=0, world_size=1, seed=0):
        tokens = corpus.tokens(split)
        lanes = batch_size * world_size
        self.lane_length = len(tokens) // lanes
        _require(self.lane_length >= length + 1, f"the {split} split of '{corpus.name}' has {len(tokens):,} tokens: "
                 f"too few for {lanes} streams of windows of {length + 1:,}; lower --batch_size or --seq_len")
        self.tokens, self.length = tokens, length
        self.lane_starts = [(rank * batch_size + i) * self.lane_length for i in range(batch_size)]
        # a seeded phase inside each lane, so different seeds read different text
        seeded = torch.Generator().manual_seed(seed)
        phase = torch.randint(0, self.lane_length - length, (batch_size,), generator=seeded)
        self.positions = [start + int(p) for start, p in zip(self.lane_starts, phase)]
        self.fresh = True

    def next(self):
        """Returns windows (B, T + 1) int64 and restarted (B,) bool: rows whose text does not continue the
        previous batch (all rows on the first call)."""
        restarted = torch.full((len(self.positions),), self.fresh)
        for i, start in enumerate(self.lane_starts):
            if self.positions[i] + self.length + 1 > start + self.lane_length:
                self.positions[i], restarted[i] = start, True
        windows = torch.stack([_window(self.tokens, p, self.length + 1) for p in self.positions])
        self.positions = [p + self.length for p in self.positions]
        self.fresh = False
        return windows, restarted

    def state_dict(self):
        return {"positions": list(self.positions), "fresh": self.fresh}

    def load_state_dict(self, state):
        self.positions, self.fresh = [int(p) for p in state["positions"]], bool(state["fresh"])


def _window(tokens, start, size):
    return torch.from_numpy(tokens[start:start + size].astype(np.int64))


def _require(condition, message):
    if not condition:
        raise DataError(message)


def load_corpus(data=DEFAULT_CORPUS, data_dir=DATA_DIR):
    """A prepared corpus by folder or by name under data_dir. The default corpus ('stdlib', or 'stdlib-TOKENIZER'
    for bytes and tiktoken encodings) is prepared on first use, so the first command a new user runs just works."""
    folder = Path(data) if Path(data).is_dir() else Path(data_dir) / data
    try:
        _recover(folder)  # a replacement of this corpus that was killed half-way
    except OSError as error:
        raise DataError(f"could not move {folder.parent / ('.' + folder.name + '.old')} back to {folder} "
                        f"({error.strerror}): rename it by hand") from None
    if (folder / "meta.json").exists():
        return Corpus(folder)
    tokenizer = data[len(DEFAULT_CORPUS) + 1:] or "bytes"
    if (data == DEFAULT_CORPUS or data.startswith(DEFAULT_CORPUS + "-")) and _is_builtin(tokenizer):
        print(f"preparing the default corpus '{data}' (once; see data.py)", file=sys.stderr)
        return Corpus(prepare(name=data, tokenizer=tokenizer, data_dir=data_dir))
    raise DataError(f"no prepared corpus '{data}' (looked for {folder}/meta.json): prepare it with "
                    f"python data.py --input PATH --name {data}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def main(argv=None):
    parser = OneLineParser(prog="data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="text file, folder of text files, or .jsonl/.jsonl.gz/.jsonl.zst with a "
                                        "'text' field (default: the Python standard library's source)")
    parser.add_argument("--name", help="corpus name, one folder name under --data_dir (default: from the input "
                                       "and the tokenizer)")
    parser.add_argument("--tokenizer", default="bytes", help="'bytes' (offline, 257 tokens), a tiktoken encoding "
                        "such as gpt2, a Hugging Face tokenizer.json (or its folder), or a hub name such as "
                        "EleutherAI/gpt-neox-20b (default: bytes)")
    parser.add_argument("--val_fraction", type=float, default=VAL_FRACTION, help="share of documents for validation")
    parser.add_argument("--workers", type=int, help="tokenising processes (default: all cores for inputs over 16 MB)")
    parser.add_argument("--data_dir", default=str(DATA_DIR), help="where corpora live (default: data/ here)")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")
    try:
        folder = prepare(args.input, args.name, args.tokenizer, args.data_dir, args.val_fraction, args.workers)
    except DataError as error:
        sys.exit(f"data.py: error: {error}")
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        sys.exit(f"data.py: error: {error.strerror or error}{where}; nothing was written")
    except KeyboardInterrupt:
        print("data.py: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    meta = json.loads((folder / "meta.json").read_text())
    for split, c in meta["splits"].items():
        print(f"{split:5s} {c['documents']:7,} documents {c['tokens']:13,} tokens")
    skipped = meta["skipped"]
    if skipped["files"] or skipped["lines"]:
        print(f"skipped {skipped['files']} unreadable or non-UTF-8 files and {skipped['lines']} jsonl lines "
              f"without a \"text\" string")
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
