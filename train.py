"""train.py: pre-train a recurrent LM, or post-train one with an initial-state intervention.

    python train.py                                   pre-train the demo model from the zero state -> out/zero
    python train.py --init state_passing              post-train out/zero with state passing -> out/state_passing
                                                      (pre-training out/zero first if it does not exist yet)
    python train.py --init tbptt --init_from PATH     post-train any checkpoint (a file or a run folder)
    torchrun --nproc_per_node=4 train.py --preset paper ...      data-parallel on 4 GPUs (or CPU processes)

This is the paper's recipe: train as usual (zero initial state), then continue for a few hundred steps at the same
training length T with a fresh optimizer, every batch starting from a state chosen by the intervention (--init,
see interventions.py). Every flag is listed by --help; --preset picks the defaults of a whole configuration:
    demo    a small byte-level Mamba-2 on the default corpus (the Python standard library's source), for a laptop CPU
    paper   a 129M-parameter Mamba-2 at T = 2048 with GPT-2 tokens, for GPUs (bring a real corpus, see data.py)

Outputs in --out_dir (default out/INIT): ckpt.pt (model, optimizer, step, random states, the intervention's state
and the arguments; written to a temporary file, then renamed), and log.jsonl (train and validation losses).
--resume continues a run exactly where it stopped. Validation reads fixed held-out sequences of 8 T tokens from the
zero state and logs the loss within the training length (val_loss) and beyond it (val_loss_beyond_T).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import DEFAULT_CORPUS, DATA_DIR, DataError, StreamBatcher, load_corpus
from interventions import INITS, make_intervention
from kernels import triton_refusal
from model import LM, MIXERS, ModelConfig

CHECKPOINT_FORMAT = "lengen-checkpoint-v1"

# Defaults of whole configurations. Flags given on the command line override them. "post_*" entries apply when
# post-training (--init other than zero, or --init_from).
PRESETS = {
    "demo": dict(
        data=DEFAULT_CORPUS, mixer="mamba2", d_model=128, n_layer=4, d_state=64, headdim=32, expand=2, n_heads=4,
        seq_len=64, batch_size=16, grad_accum=1, max_steps=3000, lr=3e-3, min_lr=3e-4, warmup_steps=100,
        post_max_steps=500, post_lr=1e-3, post_warmup_steps=20, weight_decay=0.1, grad_clip=1.0,
        eval_interval=250, eval_seqs=16, chunk_size=64, dt_min=0.001, dt_max=0.1, gate_temperature=16.0,
    ),
    "paper": dict(
        data=DEFAULT_CORPUS + "-gpt2", mixer="mamba2", d_model=768, n_layer=24, d_state=128, headdim=64, expand=2,
        n_heads=4, seq_len=2048, batch_size=16, grad_accum=4, max_steps=20000, lr=3e-3, min_lr=3e-4,
        warmup_steps=1000, post_max_steps=500, post_lr=3e-4, post_warmup_steps=50, weight_decay=0.1, grad_clip=1.0,
        eval_interval=1000, eval_seqs=16, chunk_size=64, dt_min=0.001, dt_max=0.1, gate_temperature=16.0,
    ),
}
ARCHITECTURE = ("mixer", "d_model", "n_layer", "d_state", "headdim", "expand", "n_heads", "gate", "gate_temperature",
                "dt_min", "dt_max")
RESUMABLE = ("resume", "device", "compile", "eval_interval", "log_interval", "stop_at", "out_dir", "backend",
             "max_steps")  # max_steps: a finished run can be extended (the schedule follows the new length)
# what post-training takes from the checkpoint it starts from, unless given: the paper's recipe keeps T and the data
INHERITED = ("seq_len", "batch_size", "grad_accum", "data", "data_dir", "chunk_size")
# flags that the automatic pre-training of out/zero shares with the post-training that asked for it
PRETRAIN_SHARED = ARCHITECTURE + ("preset", "data", "data_dir", "seq_len", "batch_size", "grad_accum", "seed",
                                  "device", "dtype", "compile", "backend", "chunk_size", "weight_decay",
                                  "grad_clip", "eval_seqs", "log_interval")
BASE_RUN = os.path.join("out", "zero")


class TrainError(Exception):
    """A problem with the user's options or files, told in one line that says what to do."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def build_parser():
    p = OneLineParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    g = p.add_argument_group("what to train")
    g.add_argument("--init", default="zero", choices=INITS, help="initial-state intervention (default: zero)")
    g.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="defaults of a whole configuration")
    g.add_argument("--init_from", help="post-train this checkpoint (file or run folder) with a fresh optimizer; "
                                       "default for --init other than zero: out/zero (pre-trained first if missing)")
    g.add_argument("--base_steps", type=int, help="steps of the automatic pre-training of out/zero when it is "
                                                   "missing (default: the preset's pre-training steps)")
    g.add_argument("--from_scratch", action="store_true", help="train from random weights even with --init "
                                                               "other than zero (the intervention during pre-training)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that already holds a run")
    g.add_argument("--out_dir", help="where the checkpoint and log go (default: out/INIT)")
    g = p.add_argument_group("interventions")
    g.add_argument("--noise_std", type=float, help="std of the random_noise states (default 0.1)")
    g.add_argument("--p_zero", type=float, help="fraction of rows that start from zero instead (default 0)")
    g.add_argument("--ssm_only", action="store_true", help="state_passing/tbptt: pass the SSM state only, "
                                                          "not the convolution state")
    g = p.add_argument_group("model (from the preset unless given)")
    g.add_argument("--mixer", choices=MIXERS)
    g.add_argument("--d_model", type=int)
    g.add_argument("--n_layer", type=int)
    g.add_argument("--d_state", type=int, help="mamba2: N, the state size per head")
    g.add_argument("--headdim", type=int, help="mamba2: P, the value width per head")
    g.add_argument("--expand", type=int, help="mamba2: inner width / d_model")
    g.add_argument("--dt_min", type=float, help="mamba2: smallest initial step dt; a head remembers about "
                                                "1 / (A dt) tokens, so smaller dt means longer memories")
    g.add_argument("--dt_max", type=float, help="mamba2: largest initial step dt")
    g.add_argument("--n_heads", type=int, help="gla: number of heads")
    g.add_argument("--gate", choices=("data", "none"), help="gla: data-dependent forget gate, or none "
                                                           "(plain linear attention)")
    g.add_argument("--gate_temperature", type=float, help="gla: log_decay = logsigmoid(.) / temperature; higher "
                                                          "means decays stay closer to 1 (slower forgetting)")
    g.add_argument("--backend", choices=("auto", "torch", "triton"), help="scan implementation (default auto)")
    g.add_argument("--chunk_size", type=int, help="scan chunk size")
    g = p.add_argument_group("data and optimisation (from the preset unless given)")
    g.add_argument("--data", help="a prepared corpus name under --data_dir, or its folder (see data.py)")
    g.add_argument("--data_dir", default=str(DATA_DIR), help="where corpora live")
    g.add_argument("--seq_len", type=int, help="training length T")
    g.add_argument("--batch_size", type=int, help="sequences per micro-batch, per process")
    g.add_argument("--grad_accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--max_steps", type=int, help="optimizer steps of this run")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min_lr", type=float, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup_steps", type=int, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--grad_clip", type=float, help="clip the gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_interval", type=int, help="steps between validations (and checkpoints)")
    g.add_argument("--eval_seqs", type=int, help="validation sequences of 8 T tokens")
    g.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    g.add_argument("--stop_at", type=int, help="stop after this step with a checkpoint (continue with --resume)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

def resolve_args(args, explicit):
    """Fill what the command line left open from the preset, the checkpoint being resumed or post-trained, and
    the mode (pre- or post-training). explicit: the flags the user gave. Raises TrainError on conflicts."""
    if args.resume and (args.init_from or args.from_scratch):
        raise TrainError("--resume continues a run as it was started; drop --init_from/--from_scratch")
    if args.init_from and args.from_scratch:
        raise TrainError("--init_from and --from_scratch contradict each other; give one")
    if args.p_zero is not None and not 0 <= args.p_zero <= 1:
        raise TrainError(f"--p_zero must be in [0, 1]; got {args.p_zero}")
    if args.noise_std is not None and args.init != "random_noise":
        raise TrainError("--noise_std only applies to --init random_noise")
    if args.ssm_only and args.init not in ("state_passing", "tbptt"):
        raise TrainError("--ssm_only only applies to --init state_passing or tbptt")
    if args.p_zero and args.init == "zero":
        raise TrainError("--p_zero does not apply to --init zero, whose rows all start from zero")
    args.out_dir = args.out_dir or os.path.join("out", args.init)
    if args.resume:
        return _resume_args(args, explicit)
    if checkpoint_path(args.out_dir).exists() and not args.overwrite:
        raise TrainError(f"{args.out_dir} already holds a run: --resume to continue it, --overwrite to start over, "
                         f"or choose another --out_dir")
    preset = PRESETS[args.preset]
    if args.init != "zero" and not args.init_from and not args.from_scratch:
        args.init_from = BASE_RUN  # the paper's recipe: post-train the zero-init model
    post = bool(args.init_from)
    if post and checkpoint_path(args.init_from).resolve() == checkpoint_path(args.out_dir).resolve():
        raise TrainError(f"post-training {args.init_from} into itself would overwrite it: give another --out_dir")
    if post:
        base_args = load_checkpoint(args.init_from)["args"]
        for key in INHERITED:
            if key not in explicit and key in base_args:
                setattr(args, key, base_args[key])
    for key, value in preset.items():
        if not key.startswith("post_") and getattr(args, key, None) is None:
            setattr(args, key, preset.get("post_" + key, value) if post else value)
    if post:  # the architecture is the checkpoint's; flags may restate it but not change it
        config = load_checkpoint(args.init_from)["model_config"]
        differ = [f"--{k} {getattr(args, k)}" for k in ARCHITECTURE
                  if k in explicit and getattr(args, k) != config[k]]
        if differ:
            raise TrainError(f"{checkpoint_path(args.init_from)} holds a {config['mixer']} model that "
                             f"{', '.join(differ)} would change: drop the flags or post-train another checkpoint")
        for key in ARCHITECTURE:
            setattr(args, key, config[key])
    args.noise_std = 0.1 if args.noise_std is None else args.noise_std
    args.p_zero = 0.0 if args.p_zero is None else args.p_zero
    args.backend = args.backend or "auto"
    args.gate = args.gate or "data"
    for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_seqs", "chunk_size",
                "log_interval"):
        if getattr(args, key) < 1:
            raise TrainError(f"--{key} must be at least 1")
    return args


def _resume_args(args, explicit):
    """On --resume the run continues with its own arguments; flags that would change it are refused."""
    ckpt = load_checkpoint(args.out_dir)
    saved = ckpt["args"]
    changed = [k for k in explicit if k not in RESUMABLE and k in saved and getattr(args, k) != saved[k]]
    if changed:
        raise TrainError(f"--resume continues the run in {args.out_dir} as it was started; "
                         f"{', '.join('--' + k for k in changed)} differ from it: drop them or use another --out_dir")
    runtime = {k: getattr(args, k) for k in RESUMABLE if k in explicit}
    return argparse.Namespace(**{**saved, **runtime, "resume": True, "out_dir": args.out_dir,
                                 "stop_at": args.stop_at})  # a stop belongs to one invocation only


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def checkpoint_path(path):
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() or not path.suffix else path


def save_checkpoint(path, payload):
    """Write atomically: a reader (or a crash) never sees a half-written file."""
    path = checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """A checkpoint of this project, loaded with weights_only=True (it cannot run code). One-line errors."""
    path = checkpoint_path(path)
    if not path.exists():
        raise TrainError(f"no checkpoint at {path}: train one first (python train.py) or give another path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated files and foreign pickles fail in many ways
        raise TrainError(f"{path} is not a readable checkpoint ({type(error).__name__}): it may be truncated or "
                         f"not from this project; delete it or give another path")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a checkpoint of this project (expected format {CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    """Rebuild the LM a checkpoint holds.  overrides: non-architectural config fields (backend, chunk_size)."""
    config = {**ckpt["model_config"], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        model = LM(ModelConfig(**config))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise TrainError(f"the checkpoint's model does not match this code ({str(error).splitlines()[0]})")
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --min_lr at --max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices (and embeddings, conv kernels) only, not on norms, biases or Mamba's
    A_log, D and dt_bias."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@torch.no_grad()
def validate(model, sequences, seq_len, device, autocast):
    """Mean loss from the zero state over positions [0, T) and [T, end) of fixed sequences (n, 8 T + 1), read T
    tokens at a time (memory stays that of one training window)."""
    model.eval()
    with autocast:
        losses = torch.cat([model.loss_per_position(rows.to(device), seq_len) for rows in sequences.split(4)])
    model.train()
    per_position = losses.mean(0)
    return per_position[:seq_len].mean().item(), per_position[seq_len:].mean().item()


class Run:
    """Everything one training process holds: model, optimizer, data, intervention, and its place in the run."""

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.is_main = self.rank == 0
        self.autocast, compute_dtype = autocast_for(self.device, args.dtype)
        if self.world > 1 and not self.is_main:
            dist.barrier()  # rank 0 prepares the corpus if it is missing; the others wait, then read it
        self.corpus = load_corpus(args.data, args.data_dir)
        if self.world > 1 and self.is_main:
            dist.barrier()
        self.step = 0
        self.model, source = self._build_model()
        check_backend(self.model.cfg, self.device, compute_dtype)
        self.optimizer = make_optimizer(self.model, args, self.device)
        # separate seeds: the data and the intervention must not draw the same random numbers
        self.intervention = make_intervention(args.init, self.model, args.noise_std, args.p_zero, args.ssm_only,
                                              seed=(args.seed * 1000 + self.rank) * 2 + 1)
        self.data_rng = torch.Generator().manual_seed((args.seed * 1000 + self.rank) * 2)
        self.streams = (StreamBatcher(self.corpus, "train", args.batch_size, args.seq_len, self.rank, self.world,
                                      seed=args.seed) if self.intervention.uses_streams else None)
        if source is not None:
            self._restore(source)
        self.trained = self.model
        if args.compile:
            self.trained = torch.compile(self.trained)
        if self.world > 1:
            self.trained = torch.nn.parallel.DistributedDataParallel(
                self.trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.val_sequences = self.corpus.eval_sequences(8 * args.seq_len, args.eval_seqs,
                                                        flags=("--eval_seqs", "--seq_len"))[0]

    def _build_model(self):
        """(model, checkpoint to restore from or None): resumed, post-trained from a checkpoint, or fresh."""
        args = self.args
        if args.resume:
            ckpt = load_checkpoint(args.out_dir)
            return model_from_checkpoint(ckpt, self.device, backend=args.backend), ckpt
        if args.init_from:
            ckpt = load_checkpoint(args.init_from)
            if ckpt["model_config"]["vocab_size"] != self.corpus.vocab_size:
                raise TrainError(f"{args.init_from} was trained with a vocabulary of "
                                 f"{ckpt['model_config']['vocab_size']} tokens but --data {args.data} has "
                                 f"{self.corpus.vocab_size}: post-train on a corpus with the same tokenizer")
            return model_from_checkpoint(ckpt, self.device, backend=args.backend, chunk_size=args.chunk_size), None
        torch.manual_seed(args.seed)  # every rank builds the same initial weights
        return LM(model_config(args, self.corpus.vocab_size)).to(self.device), None

    def _restore(self, ckpt):
        if len(ckpt["ranks"]) != self.world:
            raise TrainError(f"the run in {self.args.out_dir} was trained by {len(ckpt['ranks'])} process(es); "
                             f"resume it with the same number (torchrun --nproc_per_node={len(ckpt['ranks'])})")
        mine = ckpt["ranks"][self.rank]
        saved_device = mine["intervention"].get("generator_device")
        if saved_device and torch.device(saved_device).type != self.device.type:
            raise TrainError(f"the run in {self.args.out_dir} drew its random numbers on {saved_device}; resume it "
                             f"on a {torch.device(saved_device).type} device to continue it exactly")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        self.data_rng.set_state(mine["data_rng"])
        torch.set_rng_state(mine["torch_rng"])
        self.intervention.load_state_dict(_to_device(mine["intervention"], self.device))
        if self.streams is not None:
            self.streams.load_state_dict(mine["streams"])

    def next_batch(self):
        """(inputs, targets, restarted): (B, T) int64 on the device; restarted (B,) bool or None."""
        args = self.args
        if self.streams is not None:
            windows, restarted = self.streams.next()
        else:
            windows, restarted = self.corpus.random_windows("train", args.batch_size, args.seq_len,
                                                            self.data_rng), None
        windows = windows.to(self.device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:], restarted

    def train_step(self):
        """One optimizer step over grad_accum micro-batches.  Returns the mean training loss."""
        args = self.args
        lr = lr_at(self.step, args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(args.grad_accum):
            inputs, targets, restarted = self.next_batch()
            initial = self.intervention.initial_state(args.batch_size, self.device, restarted)
            last = micro == args.grad_accum - 1
            sync = contextlib.nullcontext() if (last or self.world == 1) else self.trained.no_sync()
            with sync:
                with self.autocast:
                    _, loss, final = self.trained(inputs, targets, initial)
                self.intervention.observe(final.detach())
                (loss / args.grad_accum).backward()
            total += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = total / args.grad_accum
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss.item(), lr

    def checkpoint(self):
        """Gather every rank's own random and intervention state; rank 0 writes."""
        mine = {"data_rng": self.data_rng.get_state(), "torch_rng": torch.get_rng_state(),
                "intervention": _to_device(self.intervention.state_dict(), "cpu"),
                "streams": None if self.streams is None else self.streams.state_dict()}
        ranks = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if self.is_main:
            save_checkpoint(self.args.out_dir, {
                "format": CHECKPOINT_FORMAT, "model_config": self.model.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "args": vars(self.args), "ranks": ranks,
                "corpus": {"name": self.corpus.name, "tokenizer": self.corpus.meta["tokenizer"],
                           "vocab_size": self.corpus.vocab_size}})
        if self.world > 1:
            dist.barrier()  # nobody reads the checkpoint (a post-training that follows, say) before it exists


def _to_device(obj, device):
    """Move every tensor inside nested dicts/lists (states, generator states stay on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.dtype == torch.uint8 else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def model_config(args, vocab_size):
    """The ModelConfig the architecture flags (or a preset's values, as attributes of args) describe."""
    try:
        return ModelConfig(vocab_size=vocab_size, d_model=args.d_model, n_layer=args.n_layer, mixer=args.mixer,
                           d_state=args.d_state, headdim=args.headdim, expand=args.expand, n_heads=args.n_heads,
                           gate=args.gate, chunk_size=args.chunk_size, backend=args.backend, dt_min=args.dt_min,
                           dt_max=args.dt_max, gate_temperature=args.gate_temperature)
    except ValueError as error:
        raise TrainError(f"{error}: change the model flags")


def autocast_for(device, dtype="auto"):
    """(autocast context, the dtype the scan then computes in) for a --dtype flag: bfloat16 autocast on CUDA unless
    told otherwise, float32 on the CPU."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16), compute_dtype


def pick_device(name):
    """The torch.device for a --device flag ("auto": CUDA when available), with one-line errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"unknown --device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return device


def setup_distributed(device_arg):
    """(rank, world size, device). Under torchrun: one process per GPU with NCCL, or CPU processes with gloo.
    Called once per process: the pre-training that the one-command recipe may run first shares the group."""
    device = pick_device(device_arg)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank, world, device


def check_backend(cfg, device, compute_dtype):
    """A one-line error now rather than a traceback at the first step when --backend triton cannot run."""
    if cfg.backend != "triton":
        return
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise TrainError("--backend triton needs a CUDA device; use --backend torch (or auto) on the CPU")
    P, N = cfg.head_sizes()
    refusal = triton_refusal(P, N, cfg.chunk_size, compute_dtype, device)
    if refusal:
        raise TrainError(f"--backend triton: {refusal}; or use --backend auto")


def train(args, rank=0, world=1, device=torch.device("cpu")):
    """Run training to args.max_steps (or args.stop_at).  Returns the path of the final checkpoint."""
    run = Run(args, rank, world, device)
    if run.is_main:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        mode = "resuming" if args.resume else ("post-training " + args.init_from if args.init_from else "training")
        print(f"{mode} with --init {args.init}: {run.model.num_parameters() / 1e6:.2f}M parameters, "
              f"{args.mixer}, T={args.seq_len}, {args.batch_size}x{args.grad_accum}x{run.world} sequences/step, "
              f"{args.max_steps} steps, device {run.device}, out {args.out_dir}", file=sys.stderr)
    log = open_log(args.out_dir, run.step) if run.is_main else None
    last_step = min(args.max_steps, args.stop_at or args.max_steps)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * run.world
    bar = tqdm(total=last_step, initial=run.step, disable=not run.is_main, desc=args.init, dynamic_ncols=True)
    started, start_step = time.time(), run.step
    try:
        while run.step < last_step:
            loss, lr = run.train_step()
            if not math.isfinite(loss):
                raise TrainError(f"the training loss became {loss} at step {run.step}; stopped without saving, "
                                 f"so the last good checkpoint in {args.out_dir} survives: lower --lr or "
                                 f"--grad_clip, or resume from it")
            rate = tokens_per_step * (run.step - start_step) / (time.time() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
            if log and (run.step % args.log_interval == 0 or run.step == last_step):
                _log(log, step=run.step, train_loss=loss, lr=lr, tokens_per_s=rate, time=time.time() - started)
            if run.step % args.eval_interval == 0 or run.step == last_step:
                if run.is_main:
                    inside, beyond = validate(run.model, run.val_sequences, args.seq_len, run.device, run.autocast)
                    _log(log, step=run.step, val_loss=inside, val_loss_beyond_T=beyond)
                    bar.write(f"step {run.step}: val loss {inside:.4f} within T, {beyond:.4f} at [T, 8T)")
                run.checkpoint()
    finally:
        bar.close()
        if log:
            log.close()
    return checkpoint_path(args.out_dir)


def open_log(out_dir, step):
    """log.jsonl for appending. A fresh run starts a new log; a resumed one keeps only the records up to the
    checkpoint it resumes from, so steps trained after that checkpoint (and lost) are not listed twice."""
    path = Path(out_dir) / "log.jsonl"
    kept = []
    if step > 0 and path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def _log(f, **record):
    f.write(json.dumps(record) + "\n")
    f.flush()


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    explicit = {a.dest for a in parser._actions
                if any(x == opt or x.startswith(opt + "=") for opt in a.option_strings for x in argv)}
    world = 1
    try:
        rank, world, device = setup_distributed(args.device)
        if _needs_base_run(args):
            # the paper's recipe in one command: pre-train the zero-init model first, with the shared flags
            if rank == 0:
                print(f"{BASE_RUN} does not exist yet: pre-training it first", file=sys.stderr)
            shared = [x for k in sorted(explicit & set(PRETRAIN_SHARED)) for x in _flag(k, getattr(args, k))]
            given = {k for k in explicit if k in PRETRAIN_SHARED}
            if args.base_steps:
                shared, given = shared + ["--max_steps", str(args.base_steps)], given | {"max_steps"}
            base_args = resolve_args(build_parser().parse_args(shared), given)
            train(base_args, rank, world, device)
        train(resolve_args(args, explicit), rank, world, device)
    except (TrainError, DataError) as error:
        sys.exit(f"train.py: error: {error}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _needs_base_run(args):
    """True when the one-command recipe must pre-train out/zero first; an unfinished out/zero is an error."""
    if args.init == "zero" or args.init_from or args.from_scratch or args.resume:
        return False
    if not checkpoint_path(BASE_RUN).exists():
        return True
    base = load_checkpoint(BASE_RUN)
    if base["step"] < base["args"]["max_steps"]:
        raise TrainError(f"{BASE_RUN} stopped at step {base['step']} of {base['args']['max_steps']}: finish it "
                         f"first with python train.py --resume --out_dir {BASE_RUN}")
    return False


def _flag(key, value):
    if isinstance(value, bool):
        return [f"--{key}"] if value else []
    return [f"--{key}", str(value)]


if __name__ == "__main__":
    main()
