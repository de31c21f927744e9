"""data.py: the batches that training and evaluation read from a prepared corpus.

A corpus is data/NAME/train.bin and val.bin, every document's tokens followed by end-of-text, and meta.json (its
tokenizer, counts and a stamp per preparation). corpora/ prepares them (python -m corpora --input PATH); load_corpus()
prepares the default one on first use: the Python standard library's source in byte tokens, on every machine, so
that everything works offline.

Batches (torch int64 tensors):
    Corpus.random_windows(split, B, T)   (B, T + 1) windows at random offsets: inputs [:, :-1], targets [:, 1:]
    StreamBatcher(corpus, split, B, T)   (B, T + 1) windows, row i going on exactly where it stopped in the previous
                                         batch: truncated backpropagation through time
    Corpus.eval_sequences(length, n)     (n, length + 1) fixed, evenly spaced sequences of the validation split
    CorpusBatches                        what train.py reads: training batches, validation losses within and beyond T
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from corpora import DATA_DIR, DEFAULT_CORPUS, DataError


class Corpus:
    """A prepared corpus: memory-mapped token files and the batches drawn from them."""

    def __init__(self, folder):
        self.folder = Path(folder)
        again = "prepare the corpus again (python -m corpora)"
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            dtype, self.vocab_size = np.dtype(self.meta["dtype"]), int(self.meta["vocab_size"])
            self.meta["tokenizer"], self.meta["eot_token"]  # noqa: B018 - read later; a missing one is named now
        except KeyError as error:
            raise DataError(f"{self.folder}/meta.json has no {error}: {again}") from None
        except (OSError, ValueError, TypeError):
            raise DataError(f"{self.folder} is not a prepared corpus (no readable meta.json): {again}") from None
        self.name = self.meta.get("name", self.folder.name)
        files = {split: self.folder / f"{split}.bin" for split in ("train", "val")}
        sizes = {split: f.stat().st_size if f.is_file() else 0 for split, f in files.items()}
        for split, size in sizes.items():
            _require(size > 0 and size % dtype.itemsize == 0, f"{files[split]} is missing, empty or cut short: {again}")
        # a stamp per preparation; corpora prepared before there was one are told apart by their sizes
        self.fingerprint = str(self.meta.get("created") or f"sizes-{sizes['train']}-{sizes['val']}")
        self._splits = {split: np.memmap(f, dtype=dtype, mode="r") for split, f in files.items()}

    def tokens(self, split):
        """The whole split as a 1-D memory-mapped array."""
        return self._splits[split]

    def tokenizer(self):
        """The tokenizer that made this corpus; refused when its tokenizer.json has changed since."""
        from corpora.tokenizer import get_tokenizer

        enc, recorded = get_tokenizer(self.meta["tokenizer"]), self.meta.get("tokenizer_sha256")
        _require(recorded in (None, getattr(enc, "sha256", None)), f"{self.meta['tokenizer']} is not the "
                 f"tokenizer.json that prepared corpus '{self.name}' (its sha256 was {str(recorded)[:12]}...): "
                 f"prepare the corpus again, or put that file back")
        return enc

    def random_windows(self, split, batch_size, length, generator=None):
        """(B, length + 1) int64 windows at uniformly random offsets of a split."""
        tokens = self._splits[split]
        _require(len(tokens) >= length + 2, f"the {split} split of '{self.name}' has {len(tokens):,} tokens, fewer "
                 f"than one window of {length + 1:,}: lower --seq_len or prepare a larger corpus")
        starts = torch.randint(0, len(tokens) - length - 1, (batch_size,), generator=generator)
        return torch.stack([torch.from_numpy(tokens[s:s + length + 1].astype(np.int64)) for s in starts.tolist()])

    def eval_sequences(self, length, num_seqs, split="val", flags=("--num_seqs", "--len")):
        """(num_seqs, length + 1) int64, the same on every call and machine, and their start offsets. The split is
        cut into num_seqs equal stretches; each sequence starts at the first document start of its stretch that leaves
        room (else at the stretch's start), so they never overlap. flags: the caller's options, for the message."""
        tokens = self._splits[split]
        need = num_seqs * (length + 1)
        _require(len(tokens) >= need, f"the {split} split of '{self.name}' has {len(tokens):,} tokens, but {num_seqs} "
                 f"sequences of {length + 1:,} tokens need {need:,}: lower {flags[0]} or {flags[1]}, or prepare a "
                 f"larger corpus (python -m corpora --input PATH)")
        stretch, starts = len(tokens) // num_seqs, []
        for lo in range(0, num_seqs * stretch, stretch):
            room = stretch - (length + 1)
            boundaries = np.flatnonzero(tokens[lo:lo + room + 1] == self.meta["eot_token"])
            starts.append(lo + int(boundaries[0]) + 1 if len(boundaries) and boundaries[0] < room else lo)
        sequences = torch.empty(num_seqs, length + 1, dtype=torch.int64)  # filled in place: one copy, not two
        for row, start in zip(sequences, starts):
            row.copy_(torch.from_numpy(tokens[start:start + length + 1].astype(np.int64)))
        return sequences, starts


class StreamBatcher:
    """Contiguous streams for truncated backpropagation through time. The split is cut into batch_size * world_size
    equal lanes; row i of this rank reads its own lane, T tokens a batch, so row i of batch k + 1 starts exactly where
    row i of batch k stopped (the last target of one window is the first input of the next). A lane that runs out
    starts over, and next() says which rows did, since their carried state no longer belongs to the text."""

    def __init__(self, corpus, split, batch_size, length, rank=0, world_size=1, seed=0):
        tokens = corpus.tokens(split)
        lanes = batch_size * world_size
        self.lane_length = len(tokens) // lanes
        _require(self.lane_length >= length + 1, f"the {split} split of '{corpus.name}' has {len(tokens):,} tokens: "
                 f"too few for {lanes} streams of windows of {length + 1:,}; lower --batch_size or --seq_len")
        self.tokens, self.length = tokens, length
        self.lane_starts = [(rank * batch_size + i) * self.lane_length for i in range(batch_size)]
        # a seeded phase inside each lane, so that different seeds read different text
        seeded = torch.Generator().manual_seed(seed)
        phase = torch.randint(0, self.lane_length - length, (batch_size,), generator=seeded)
        self.positions = [start + int(p) for start, p in zip(self.lane_starts, phase)]
        self.fresh = True

    def next(self):
        """Windows (B, T + 1) int64 and restarted (B,) bool: the rows whose text does not continue the previous
        batch (all on the first call)."""
        restarted = torch.full((len(self.positions),), self.fresh)
        for i, start in enumerate(self.lane_starts):
            if self.positions[i] + self.length + 1 > start + self.lane_length:
                self.positions[i], restarted[i] = start, True
        windows = torch.stack([torch.from_numpy(self.tokens[p:p + self.length + 1].astype(np.int64))
                               for p in self.positions])
        self.positions, self.fresh = [p + self.length for p in self.positions], False
        return windows, restarted

    def state_dict(self):
        return {"positions": list(self.positions), "fresh": self.fresh}

    def load_state_dict(self, state):
        self.positions, self.fresh = [int(p) for p in state["positions"]], bool(state["fresh"])


class CorpusBatches:
    """What train.py reads from a prepared corpus: training batches, and fixed validation sequences of 8 T tokens.
    args: the run's options (batch_size, seq_len, eval_seqs, seed).

    next() -> (inputs, targets, restarted) on the CPU: random windows, or with streams (tbptt) windows whose row i
    continues row i of the previous batch. state_dict() holds where the data stands, for an exact resume."""

    def __init__(self, corpus, args, rank, world, seed, streams):
        self.corpus, self.batch_size, self.seq_len = corpus, args.batch_size, args.seq_len
        self.rng = torch.Generator().manual_seed(seed)
        self.streams = (StreamBatcher(corpus, "train", args.batch_size, args.seq_len, rank, world, seed=args.seed)
                        if streams else None)
        self.val_sequences = corpus.eval_sequences(8 * args.seq_len, args.eval_seqs,
                                                   flags=("--eval_seqs", "--seq_len"))[0]

    def next(self):
        if self.streams is not None:
            windows, restarted = self.streams.next()
        else:
            windows, restarted = self.corpus.random_windows("train", self.batch_size, self.seq_len, self.rng), None
        return windows[:, :-1], windows[:, 1:], restarted

    @torch.no_grad()
    def validate(self, model, device, autocast):
        """Mean loss from the zero state over positions [0, T) and [T, 8T) of the validation sequences (n, 8 T + 1),
        read T tokens at a time (memory stays that of one training window)."""
        T = self.seq_len
        with autocast:
            losses = torch.cat([model.loss_per_position(rows.to(device), T) for rows in self.val_sequences.split(4)])
        per_position = losses.mean(0)
        return {"val_loss": per_position[:T].mean().item(), "val_loss_beyond_T": per_position[T:].mean().item()}

    def refusal(self, model):
        """Why model cannot be trained on this corpus's tokens, or None."""
        mismatch = tokenizer_mismatch(self.corpus.meta, getattr(model, "trained_on", None))
        if mismatch:
            return (f"{mismatch}: prepare the corpus with its tokenizer (python -m corpora --input PATH --tokenizer "
                    f"{model.trained_on['tokenizer']})")
        if model.cfg.vocab_size < self.corpus.vocab_size:
            return (f"it was trained with a vocabulary of {model.cfg.vocab_size} tokens but the corpus has "
                    f"{self.corpus.vocab_size}: use a corpus prepared with its tokenizer")
        return None

    def describe(self):
        """What the checkpoint records of the data: the corpus and, to notice a re-preparation, its fingerprint."""
        meta = self.corpus.meta
        return {"name": self.corpus.name, "tokenizer": meta["tokenizer"], "vocab_size": self.corpus.vocab_size,
                "tokenizer_sha256": meta.get("tokenizer_sha256"), "fingerprint": self.corpus.fingerprint}

    def state_dict(self):
        return {"data_rng": self.rng.get_state(), "streams": self.streams and self.streams.state_dict()}

    def load_state_dict(self, state):
        self.rng.set_state(state["data_rng"])
        if self.streams is not None:
            self.streams.load_state_dict(state["streams"])


def _require(condition, message):
    if not condition:
        raise DataError(message)


def load_corpus(data=DEFAULT_CORPUS, data_dir=DATA_DIR):
    """A prepared corpus by folder or by name under data_dir. The default corpus ('stdlib', or 'stdlib-TOKENIZER'
    for bytes and tiktoken encodings) is prepared on first use (corpora/), so the first command a new user runs
    just works."""
    folder = Path(data) if Path(data).is_dir() else Path(data_dir) / data
    if (folder.parent / f".{folder.name}.old").exists() or any(folder.parent.glob(".*@*")):
        from corpora.prepare import _clean_up

        try:  # what killed preparations left: a replacement cut short (the old corpus comes back), work folders
            _clean_up(folder.parent, folder.name)
        except OSError as error:
            raise DataError(f"could not put {folder.parent}/.{folder.name}.old back as {folder} ({error.strerror}): "
                            f"rename it by hand") from None
    if (folder / "meta.json").exists():
        return Corpus(folder)
    from corpora.prepare import prepare
    from corpora.tokenizer import get_tokenizer, is_builtin

    tokenizer = data[len(DEFAULT_CORPUS) + 1:] or "bytes"
    _require((data == DEFAULT_CORPUS or data.startswith(DEFAULT_CORPUS + "-")) and is_builtin(tokenizer),
             f"no prepared corpus '{data}' (looked for {folder}/meta.json): prepare it with python -m corpora "
             f"--input PATH --name {data}")
    try:
        get_tokenizer(tokenizer)
    except DataError:
        raise DataError(f"the default corpus '{data}' needs tiktoken's {tokenizer} vocabulary, which could not be "
                        f"downloaded (offline?): set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files, "
                        f"or read byte tokens (--data {DEFAULT_CORPUS})") from None
    print(f"preparing the default corpus '{data}' (once; see corpora/)", file=sys.stderr)
    return Corpus(prepare(name=data, tokenizer=tokenizer, data_dir=data_dir))


def tokenizer_mismatch(corpus_meta, model_tokenizer):
    """None when a corpus (its meta.json) and a model (model.trained_on: what it was trained with) use the same
    tokenizer, else why not, in a few words. Both are dicts with "tokenizer" (a name) and "tokenizer_sha256" (of its
    tokenizer.json, None for bytes and tiktoken); missing keys are None. The sha256 decides when both sides have one
    (a hub name and a local copy of its file agree); otherwise the names do. A model whose tokenizer is unknown
    matches."""
    corpus, model = ({"tokenizer": (d or {}).get("tokenizer"), "tokenizer_sha256": (d or {}).get("tokenizer_sha256")}
                     for d in (corpus_meta, model_tokenizer))
    if corpus["tokenizer_sha256"] and model["tokenizer_sha256"]:
        if corpus["tokenizer_sha256"] == model["tokenizer_sha256"]:
            return None
        return (f"the corpus was tokenised by {corpus['tokenizer']} (tokenizer.json sha256 "
                f"{corpus['tokenizer_sha256'][:12]}), the model by {model['tokenizer']} (sha256 "
                f"{model['tokenizer_sha256'][:12]})")
    if model["tokenizer"] is None or corpus["tokenizer"] == model["tokenizer"]:
        return None
    return f"the corpus was tokenised by {corpus['tokenizer']}, the model by {model['tokenizer']}"
