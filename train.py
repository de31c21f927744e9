"""train.py: pre-train a recurrent LM, or post-train one with an initial-state intervention.

    python train.py                                   pre-train the demo model from the zero state -> out/zero
    python train.py --init state_passing              post-train out/zero with state passing -> out/state_passing
                                                      (pre-training out/zero first if it does not exist yet)
    python train.py --init tbptt --init_from PATH     post-train any checkpoint (a file or a run folder), or an
                                                      official Mamba-2 (state-spaces/mamba2-370m, see pretrained.py)
    python train.py --task copy                       a synthetic task of tasks.py instead of text -> out/copy/zero
    python train.py --task passkey --init fitted_noise --init_from state-spaces/mamba2-370m
                                                      the paper's passkey fine-tuning (1000 steps at T = 2048) in
                                                      the model's own tokenizer -> out/passkey/fitted_noise
    torchrun --nproc_per_node=4 train.py --preset paper ...      data-parallel on 4 GPUs (or CPU processes)

This is the paper's recipe: train as usual (zero initial state), then continue for a few hundred steps at the same
training length T with a fresh optimizer, every batch starting from a state chosen by the intervention (--init,
see interventions.py): the three marked lines of train_step(). Every flag is listed by --help; --preset picks the
defaults of a whole configuration (PRESETS):
    demo    a small byte-level Mamba-2 on the default corpus (the Python standard library's source), for a laptop CPU
    paper   a 129M-parameter Mamba-2 (the size of the official mamba2-130m) at T = 2048 with GPT-2 tokens, for GPUs
    mamba2-130m, mamba2-370m, mamba2-780m, mamba2-1.3b
            post-train that official Mamba-2 model at its T = 2048 on a corpus of its GPT-NeoX tokens (for GPUs)

Outputs in --out_dir (default out/INIT): ckpt.pt (model, optimizer, step, random states, the intervention's state
and the arguments; written atomically, never with weights that are not finite) and log.jsonl (train and validation
losses). --resume continues a run exactly where it stopped; Ctrl-C stops at the end of the current step with a
checkpoint. Validation reads fixed held-out sequences of 8 T tokens from the zero state and logs the loss within the
training length (val_loss) and beyond it (val_loss_beyond_T). A run that would not fit in memory is refused before
its first step.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import DEFAULT_CORPUS, DATA_DIR, DataError, StreamBatcher, get_tokenizer, load_corpus, tokenizer_mismatch
from interventions import INITS, make_intervention
from model import (LM, ModelConfig, OneLineParser, UsageError, autocast_for, check_backend, checkpoint_path,
                   first_nonfinite, load_checkpoint, pick_device)
from pretrained import OFFICIAL
from tasks import TASKS, make_task


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------

def train_step(run):
    """One optimizer step over grad_accum micro-batches.  Returns the mean training loss and the learning rate."""
    args = run.args
    lr = lr_at(run.step, args)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro in range(args.grad_accum):
        inputs, targets, restarted = run.next_batch()  # (B, T) int64 each; restarted (B,) bool or None
        initial = run.intervention.initial_state(inputs.shape[0], run.device, restarted)  # 1. where it starts
        with run.gradient_sync(micro == args.grad_accum - 1):
            with run.autocast:
                _, loss, final = run.trained(inputs, targets, initial)  # 2. read the batch from there
            (loss / args.grad_accum).backward()
        run.intervention.observe(final.detach())  # 3. the state it ended in (what state passing hands on)
        total += loss.detach()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return run.mean_over_processes(total / args.grad_accum), lr


def train(args, rank=0, world=1, device=torch.device("cpu"), base=None):
    """Train to args.max_steps (or --stop_at), validating and saving every eval_interval steps; base: the model that
    --init_from names (resolve_args loads it). Returns the checkpoint path. Raises UsageError when the run cannot go
    on, Stopped at a Ctrl-C."""
    run = Run(args, rank, world, device, base)
    last_step = min(args.max_steps, args.stop_at or args.max_steps)
    with Progress(run, last_step) as progress, StopRequests(run) as stop:
        while run.step < last_step:
            started = time.perf_counter()
            loss, lr = train_step(run)
            if not math.isfinite(loss):
                raise UsageError(f"the training loss became {loss} at step {run.step}; stopped without saving: "
                                 f"{run.what_survives()}; start again with a lower --lr or --grad_clip")
            progress.step(loss, lr, seconds=time.perf_counter() - started)
            if run.step % args.eval_interval == 0 or run.step == last_step:
                run.checkpoint(progress.validation(run.validate()))
            if stop.requested() and run.step < last_step:  # Ctrl-C: stop here, at the end of a whole step
                if run.saved_step != run.step:
                    run.checkpoint()
                raise Stopped(f"stopped at step {run.step}; continue with python train.py --resume --out_dir "
                              f"{args.out_dir}")
    progress.finish()
    return checkpoint_path(args.out_dir)


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


# ----------------------------------------------------------------------------------------------------------------
# Configurations and flags
# ----------------------------------------------------------------------------------------------------------------

# Defaults of whole configurations; flags given on the command line override them. "model" holds ModelConfig fields
# (the others keep ModelConfig's defaults), "train" the other flags; "post" replaces some of those when
# post-training (--init_from, or an --init other than zero).
PRESETS = {
    "demo": dict(
        model=dict(mixer="mamba2", d_model=128, n_layer=4, d_state=64, headdim=32),
        train=dict(data=DEFAULT_CORPUS, seq_len=64, batch_size=16, grad_accum=1, max_steps=3000, lr=3e-3,
                   min_lr=3e-4, warmup_steps=100, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_seqs=16),
        post=dict(max_steps=500, lr=1e-3, warmup_steps=20),
    ),
    "paper": dict(
        model=dict(mixer="mamba2", d_model=768, n_layer=24, recompute=True),  # the official mamba2-130m's size
        train=dict(data=DEFAULT_CORPUS + "-gpt2", seq_len=2048, batch_size=16, grad_accum=4, max_steps=20000,
                   lr=3e-3, min_lr=3e-4, warmup_steps=1000, weight_decay=0.1, grad_clip=1.0, eval_interval=1000,
                   eval_seqs=16),
        post=dict(max_steps=500, lr=3e-4, warmup_steps=50),
    ),
}
# Post-training the official Mamba-2 language models (pretrained.py) at their training length T = 2048, on a corpus
# prepared with their tokenizer (python data.py --input PATH --tokenizer EleutherAI/gpt-neox-20b --name pile-neox).
# A step is 256 sequences of 2048 tokens (0.5M tokens, the batch of Mamba-2's pre-training) as batch_size x
# grad_accum on one process (under torchrun, divide --grad_accum by the number of processes); 500 steps read 262M
# tokens. --from_scratch trains the same architecture from random weights instead.
for _name, _batch_size in (("mamba2-130m", 16), ("mamba2-370m", 8), ("mamba2-780m", 4), ("mamba2-1.3b", 2)):
    PRESETS[_name] = dict(
        init_from=f"state-spaces/{_name}",
        model=dict(mixer="mamba2", **OFFICIAL[f"state-spaces/{_name}"], recompute=True),  # or they do not fit
        train=dict(data="pile-neox", seq_len=2048, batch_size=_batch_size, grad_accum=256 // _batch_size,
                   max_steps=500, lr=3e-4, min_lr=3e-5, warmup_steps=50, weight_decay=0.1, grad_clip=1.0,
                   eval_interval=100, eval_seqs=16),
        post={})
# --task copy: the CPU-sized setting where the zero-init model copies strings up to n_train = 16 almost perfectly and
# fails on longer ones (tasks.CopyTask's defaults; README, "Synthetic copying"); post-training adds 20% more steps.
PRESETS["copy"] = dict(
    model=dict(mixer="mamba2", d_model=128, n_layer=2, d_state=32, headdim=32),
    train=dict(batch_size=16, grad_accum=1, max_steps=1000, lr=3e-3, min_lr=3e-4, warmup_steps=100,
               weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_seqs=16),
    post=dict(max_steps=200, lr=1e-3, min_lr=1e-4, warmup_steps=10))
# --task passkey fine-tunes the --init_from model with its preset (an official model's, else demo's post-training)
# for the paper's 1000 steps; T is the task's 2048
TASK_DEFAULTS = {"passkey": dict(max_steps=1000)}
TASK_OPTIONS = {name: help for task in TASKS.values() for name, help in task.options.items()}
MODEL_FLAGS = [f for f in dataclasses.fields(ModelConfig) if "help" in f.metadata]
ARCHITECTURE = [f.name for f in MODEL_FLAGS if not f.metadata.get("runtime")]  # what post-training cannot change
# what may change on --resume (max_steps: a finished run can be extended; the schedule follows the new length)
RESUMABLE = {"resume", "out_dir", "device", "compile", "backend", "recompute", "eval_interval", "log_interval",
             "stop_at", "max_steps"}
# what post-training takes from the checkpoint it starts from, unless given: the paper's recipe keeps T and the data
INHERITED = ("seq_len", "batch_size", "grad_accum", "task", "data", "data_dir", "chunk_size", *TASK_OPTIONS)
# what the automatic pre-training of out/zero does not take from the command line that asked for it
POST_ONLY = {"init", "init_from", "base_steps", "from_scratch", "resume", "overwrite", "out_dir", "noise_std",
             "p_zero", "ssm_only", "max_steps", "lr", "min_lr", "warmup_steps", "eval_interval", "stop_at"}
CAN_BE_ZERO = {"min_lr", "weight_decay", "grad_clip", "noise_std", "p_zero", "context"}  # others must be above 0


def build_parser():
    p = OneLineParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    g = p.add_argument_group("what to train")
    g.add_argument("--init", default="zero", choices=INITS, help="initial-state intervention (default: zero)")
    g.add_argument("--preset", default="demo", choices=PRESETS, help="defaults of a whole configuration")
    g.add_argument("--task", default="lm", choices=["lm", *TASKS], help="lm: language modelling on --data "
                   "(default); or a synthetic task of tasks.py, whose own held-out batches validate; passkey "
                   "fine-tunes --init_from on examples in the tokenizer it was trained with")
    g.add_argument("--init_from", help="post-train this with a fresh optimizer: a checkpoint (file or run folder), "
                   "an official Mamba-2 (state-spaces/mamba2-370m) or a folder with its config.json and weights "
                   "(see pretrained.py); default for --init other than zero: out/zero (pre-trained first if missing)")
    g.add_argument("--base_steps", type=int, help="steps of the automatic pre-training of out/zero when it is "
                                                   "missing (default: the preset's pre-training steps)")
    g.add_argument("--from_scratch", action="store_true", help="train from random weights even with --init "
                                                               "other than zero (the intervention during pre-training)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that already holds a run")
    g.add_argument("--out_dir", help="where the checkpoint and log go (default: out/INIT)")
    g = p.add_argument_group("interventions")
    g.add_argument("--noise_std", type=float, help="random_noise: std of the states (default 0.1)")
    g.add_argument("--p_zero", type=float, help="fraction of rows that start from zero instead (default 0)")
    g.add_argument("--ssm_only", action="store_true", help="state_passing/tbptt: pass the SSM state only, "
                                                          "not the convolution state")
    g = p.add_argument_group("model (from the preset unless given; see ModelConfig in model.py)")
    for f in MODEL_FLAGS:
        if f.type is bool:  # --recompute / --no-recompute
            g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            g.add_argument(f"--{f.name}", type=f.type, choices=f.metadata.get("choices"), help=f.metadata["help"])
    g = p.add_argument_group("synthetic tasks (with --task; see tasks.py)")
    for name, help in TASK_OPTIONS.items():
        g.add_argument(f"--{name}", type=int, help=help)
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
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_interval", type=int, help="steps between validations (and checkpoints)")
    g.add_argument("--eval_seqs", type=int, help="validation sequences of 8 T tokens (--task: held-out batches)")
    g.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    g.add_argument("--stop_at", type=int, help="stop after this step with a checkpoint (continue with --resume)")
    return p


def check_numbers(args, parser):
    """Every integer flag but --seed counts something (at least 1); every float is finite and above zero, or at
    least zero where zero means off."""
    for action in parser._actions:
        value, name = getattr(args, action.dest, None), action.dest
        if value is None or name == "seed":
            continue
        if action.type is int and value < (0 if name in CAN_BE_ZERO else 1):
            raise UsageError(f"--{name} must be at least {0 if name in CAN_BE_ZERO else 1}")
        if action.type is float and not (math.isfinite(value) and (value > 0 or value == 0 and name in CAN_BE_ZERO)):
            raise UsageError(f"--{name} must be a finite number {'of at least' if name in CAN_BE_ZERO else 'above'} "
                             f"0; got {value}")
    if args.p_zero is not None and not 0 <= args.p_zero <= 1:
        raise UsageError(f"--p_zero must be in [0, 1]; got {args.p_zero}")


def resolve_args(args, explicit):
    """Fill what the command line left open from the preset, the checkpoint being resumed or post-trained, and
    the mode (pre- or post-training). explicit: the flags the user gave. Returns (args, the model --init_from names,
    loaded on the CPU, or None). Raises UsageError on conflicts."""
    if args.resume and (args.init_from or args.from_scratch):
        raise UsageError("--resume continues a run as it was started; drop --init_from/--from_scratch")
    if args.init_from and args.from_scratch:
        raise UsageError("--init_from and --from_scratch contradict each other; give one")
    for name in ("noise_std", "ssm_only"):
        takers = [init for init, cls in INITS.items() if name in cls.options]
        if getattr(args, name) and args.init not in takers:
            raise UsageError(f"--{name} only applies to --init {' or '.join(takers)}")
    if args.p_zero and args.init == "zero":
        raise UsageError("--p_zero does not apply to --init zero, whose rows all start from zero")
    args.out_dir = args.out_dir or default_out_dir(args.task, args.init)
    if Path(args.out_dir).is_file():
        raise UsageError(f"--out_dir {args.out_dir} is a file: give a folder (it will hold ckpt.pt and log.jsonl)")
    if args.resume:
        return resume_args(args, explicit), None
    if checkpoint_path(args.out_dir).exists() and not args.overwrite:
        raise UsageError(f"{args.out_dir} already holds a run: --resume to continue it, --overwrite to start over, "
                         f"or choose another --out_dir")
    if "preset" not in explicit:  # --init_from state-spaces/mamba2-370m alone means that model's preset,
        implied = [name for name, p in PRESETS.items() if args.init_from and p.get("init_from") == args.init_from]
        args.preset = (implied + [args.task if args.task in PRESETS else args.preset])[0]  # --task copy: "copy"
    preset, base = PRESETS[args.preset], None
    if not args.from_scratch:
        args.init_from = args.init_from or preset.get("init_from")
    if reads_text(args.task) and not args.init_from:
        raise UsageError(f"--task {args.task} fine-tunes a language model on examples in its own tokenizer: give "
                         f"--init_from (a checkpoint trained on a corpus, or an official Mamba-2 such as "
                         f"state-spaces/mamba2-370m)")
    if args.init != "zero" and not args.init_from and not args.from_scratch:
        args.init_from = default_out_dir(args.task, "zero")  # the paper's recipe: post-train the zero-init model
    defaults = {**preset["model"], **preset["train"], **(preset["post"] if args.init_from else {}),
                **TASK_DEFAULTS.get(args.task, {})}
    if args.init_from:
        if checkpoint_path(args.init_from).resolve() == checkpoint_path(args.out_dir).resolve():
            raise UsageError(f"post-training {args.init_from} into itself would overwrite it: give another --out_dir")
        base, trained_with = load_base(args.init_from)
        differ = [f"--{k} {getattr(args, k)}" for k in ARCHITECTURE
                  if k in explicit and getattr(args, k) != getattr(base.cfg, k)]
        if differ:
            raise UsageError(f"{args.init_from} holds a {base.cfg.mixer} model that {', '.join(differ)} would "
                             f"change: drop the flags or post-train another checkpoint")
        inherited = {k: v for k, v in trained_with.items() if k in INHERITED and k not in explicit and v is not None}
        vars(args).update({k: getattr(base.cfg, k) for k in ARCHITECTURE}, **inherited)
        if reads_text(args.task):  # (the task may be inherited: fine-tuning a passkey run further)
            args.tokenizer = base_tokenizer(base, args)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.task != "lm":
        if explicit & {"data", "seq_len"}:
            raise UsageError(f"--task {args.task} makes its own examples; drop --data and --seq_len")
        args.seq_len = build_task(args).train_tokens  # T: the longest training example
    args.noise_std = 0.1 if args.noise_std is None else args.noise_std
    args.p_zero = 0.0 if args.p_zero is None else args.p_zero
    return args, base


def base_tokenizer(base, args):
    """The tokenizer (a data.get_tokenizer spec) that the text of the model --init_from names was in: an official
    model's or a folder's (model.trained_on), a checkpoint's corpus's. Bytes are a tokenizer like any other."""
    spec = base.trained_on["tokenizer"]
    if spec is None:
        raise UsageError(f"--task {args.task} writes its examples in the tokens of the model it fine-tunes, but "
                         f"{args.init_from} does not say which tokenizer it was trained with: fine-tune a model "
                         f"trained on a prepared corpus, or a folder that has its tokenizer.json beside the weights")
    return spec


def build_task(args):
    """The synthetic task of args.task with its settings; a task in words (needs_tokenizer) in args.tokenizer, the
    tokenizer of the model it fine-tunes. Raises UsageError, or DataError when that tokenizer cannot be had."""
    try:
        if reads_text(args.task):
            return TASKS[args.task](get_tokenizer(args.tokenizer))
        return make_task(args.task, vars(args))
    except ValueError as error:
        raise UsageError(f"--task {args.task}: {error}") from None


def reads_text(task):
    """Whether --task is written in words, so that only a language model in its own tokenizer can learn it."""
    return getattr(TASKS.get(task), "needs_tokenizer", False)


def load_base(init_from):
    """(model in train mode on the CPU, the arguments it was trained with) for --init_from: a checkpoint of this
    project (any local path but a folder with a config.json), or else what LM.from_pretrained loads (a Hugging Face
    hub name, or a folder with config.json), whose training length T is all that is known of its training."""
    path = Path(init_from)
    if not (path / "config.json").is_file() and (path.exists() or path.parent.is_dir()):
        ckpt = load_checkpoint(path)
        return LM.from_checkpoint(ckpt).train(), ckpt.get("args") or {}
    model = LM.from_pretrained(init_from)
    return model.train(), {"seq_len": model.trained_on.get("seq_len")}


def default_out_dir(task, init):
    """out/INIT, or out/TASK/INIT for a synthetic task."""
    return os.path.join("out", *([] if task == "lm" else [task]), init)


def resume_args(args, explicit):
    """On --resume the run continues with its own arguments; flags that would change it are refused."""
    saved = load_checkpoint(args.out_dir, require=("args",))["args"]
    changed = [k for k in explicit - RESUMABLE if k in saved and getattr(args, k) != saved[k]]
    if changed:
        raise UsageError(f"--resume continues the run in {args.out_dir} as it was started; "
                         f"{', '.join('--' + k for k in changed)} differ from it: drop them or use another --out_dir")
    defaults = vars(build_parser().parse_args([]))  # for flags newer than the checkpoint
    given = {k: getattr(args, k) for k in explicit & RESUMABLE}
    return argparse.Namespace(**{**defaults, **saved, **given, "resume": True, "out_dir": args.out_dir,
                                 "stop_at": args.stop_at})  # a stop belongs to one invocation only


def base_run_args(args, explicit):
    """The arguments of the automatic pre-training of out/zero: the same command line with --init zero, without
    the flags that only concern the post-training, and --base_steps as its --max_steps."""
    shared = explicit - POST_ONLY
    base = build_parser().parse_args([])
    vars(base).update({k: getattr(args, k) for k in shared}, max_steps=args.base_steps)
    return resolve_args(base, shared)[0]


def model_config(args, vocab_size):
    """The ModelConfig of the model flags (ModelConfig's defaults where they are None)."""
    try:
        return ModelConfig(vocab_size=vocab_size, **{f.name: getattr(args, f.name) for f in MODEL_FLAGS
                                                     if getattr(args, f.name) is not None})
    except (TypeError, ValueError) as error:
        raise UsageError(f"{error}: change the model flags")


# ----------------------------------------------------------------------------------------------------------------
# One training process
# ----------------------------------------------------------------------------------------------------------------

class Run:
    """Everything one training process holds: data, model, optimizer, intervention, and its place in the run."""

    def __init__(self, args, rank, world, device, base=None):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.is_main = rank == 0
        self.autocast, compute_dtype = autocast_for(device, args.dtype)
        seed = (args.seed * 1000 + rank) * 2  # the data and the intervention must not draw the same numbers
        self.batches = (TaskBatches(build_task(args), args, seed) if args.task != "lm" else
                        CorpusBatches(open_corpus(args, rank, world), args, rank, world, seed,
                                      streams=INITS[args.init].uses_streams))
        self.step, self.saved_step, self.tokens = 0, None, 0  # tokens: read by this process in this invocation
        self.model, ckpt = self._build_model(base)
        vars(args).update({f.name: getattr(self.model.cfg, f.name) for f in MODEL_FLAGS})  # recorded as built
        check_backend(self.model.cfg, device, compute_dtype)
        check_memory(self.model, args, device, self.autocast)
        self.optimizer = make_optimizer(self.model, args, device)
        self.intervention = make_intervention(args.init, self.model, args.p_zero, seed + 1,
                                              noise_std=args.noise_std, ssm_only=args.ssm_only)
        if ckpt is not None:
            self._restore(ckpt)
        self.trained = torch.compile(self.model) if args.compile else self.model
        if world > 1:
            self.trained = torch.nn.parallel.DistributedDataParallel(
                self.trained, device_ids=[device.index] if device.type == "cuda" else None)
        if self.is_main:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            print(self.describe(), file=sys.stderr)

    def _build_model(self, base):
        """(model, checkpoint to continue or None): resumed, post-trained from base, or fresh."""
        args = self.args
        if args.resume:
            ckpt = load_checkpoint(args.out_dir, require=("model_config", "model", "optimizer", "step", "ranks"))
            return LM.from_checkpoint(ckpt, self.device, backend=args.backend, recompute=args.recompute).train(), ckpt
        if args.init_from:
            refusal = self.batches.refusal(base)
            if refusal:
                raise UsageError(f"cannot post-train {args.init_from} on {self.batches.describe()['name']}: "
                                 f"{refusal}")
            base.cfg.chunk_size = args.chunk_size or base.cfg.chunk_size  # how the scan runs, not what it computes
            base.cfg.backend = args.backend or base.cfg.backend
            base.cfg.recompute = base.cfg.recompute if args.recompute is None else args.recompute
            return base.to(self.device), None
        torch.manual_seed(args.seed)  # every process builds the same initial weights
        return LM(model_config(args, self.batches.vocab_size)).to(self.device), None

    def _restore(self, ckpt):
        """Continue a run: optimizer, step, and each process's random states, data position and intervention."""
        out_dir = self.args.out_dir
        saved, current = (ckpt.get("corpus") or {}).get("fingerprint"), self.batches.describe()["fingerprint"]
        if saved and saved != current:
            raise UsageError(f"corpus '{self.args.data}' was prepared again after the run in {out_dir} started, so "
                             f"resuming would continue on other data: put the original corpus back, or post-train "
                             f"the checkpoint into a new run with --init_from {out_dir} --out_dir NEW")
        if len(ckpt["ranks"]) != self.world:
            raise UsageError(f"the run in {out_dir} was trained by {len(ckpt['ranks'])} process(es); resume it with "
                             f"the same number (torchrun --nproc_per_node={len(ckpt['ranks'])})")
        mine = ckpt["ranks"][self.rank]
        saved_device = mine["intervention"].get("generator_device")
        if saved_device and torch.device(saved_device).type != self.device.type:
            raise UsageError(f"the run in {out_dir} drew its random numbers on {saved_device}; resume it on a "
                             f"{torch.device(saved_device).type} device to continue it exactly")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = self.saved_step = ckpt["step"]
        torch.set_rng_state(mine["torch_rng"])
        self.batches.load_state_dict(mine)
        self.intervention.load_state_dict(_to_device(mine["intervention"], self.device))

    def describe(self):
        args = self.args
        mode = "resuming" if args.resume else ("post-training " + args.init_from if args.init_from else "training")
        per_step = args.batch_size * args.grad_accum * self.world
        split = f" ({args.batch_size} x {args.grad_accum} micro-batches x {self.world} processes)" \
            if per_step != args.batch_size else ""
        return (f"{mode} with --init {args.init}: {self.model.num_parameters() / 1e6:.2f}M parameters, {args.mixer}, "
                f"{per_step} sequences of {args.seq_len} tokens per step{split}, {args.max_steps} steps, "
                f"device {self.device}, out {args.out_dir}")

    def next_batch(self):
        """(inputs, targets, restarted): (B, T) int64 on the device; restarted (B,) bool or None."""
        inputs, targets, restarted = self.batches.next()
        self.tokens += inputs.numel()
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True), restarted

    def gradient_sync(self, last_micro_batch):
        """Processes average their gradients in the backward pass of a step's last micro-batch only."""
        return contextlib.nullcontext() if last_micro_batch or self.world == 1 else self.trained.no_sync()

    def mean_over_processes(self, value):
        """A scalar tensor averaged over the processes, as a float."""
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        return value.item()

    def validate(self):
        """Rank 0's validation losses ({name: loss}); None on the other processes."""
        if not self.is_main:
            return None
        self.model.eval()
        losses = self.batches.validate(self.model, self.device, self.autocast)
        self.model.train()
        return losses

    def checkpoint(self, losses=None):
        """Save the run: rank 0 writes, every process contributes its own random, data and intervention state.
        Weights (or validation losses) that are not finite are refused with a UsageError, and nothing is saved."""
        broken = first_nonfinite(self.model.state_dict())
        broken = f"the weight {broken}" if broken else next((k for k, v in (losses or {}).items()
                                                             if not math.isfinite(v)), None)
        if broken:
            raise UsageError(f"{broken} is not finite after step {self.step}; stopped without saving: "
                             f"{self.what_survives()}; start again with a lower --lr or --grad_clip")
        mine = {"torch_rng": torch.get_rng_state(), "intervention": _to_device(self.intervention.state_dict(), "cpu"),
                **self.batches.state_dict()}
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        if self.is_main:
            self.model.save(self.args.out_dir, optimizer=self.optimizer.state_dict(), step=self.step,
                            args=vars(self.args), ranks=ranks, corpus=self.batches.describe())
        self.saved_step = self.step
        if self.world > 1:
            dist.barrier()  # nobody reads the checkpoint (a post-training that follows, say) before it exists

    def what_survives(self):
        if self.saved_step is not None:
            return f"the last good checkpoint (step {self.saved_step}) in {self.args.out_dir} survives"
        if checkpoint_path(self.args.out_dir).exists():
            return f"no checkpoint of this run was written ({self.args.out_dir} still holds the run it replaces)"
        return "no checkpoint was written"


def _to_device(obj, device):
    """Move every tensor inside nested dicts/lists (generator states, uint8, stay on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.dtype == torch.uint8 else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

class CorpusBatches:
    """Training batches from a prepared corpus, and its fixed validation sequences of 8 T tokens.

    next() -> (inputs, targets, restarted) on the CPU: random windows, or with streams (tbptt) windows whose row i
    continues row i of the previous batch. state_dict() holds where the data stands, for an exact resume."""

    def __init__(self, corpus, args, rank, world, seed, streams):
        self.corpus, self.batch_size, self.seq_len = corpus, args.batch_size, args.seq_len
        self.vocab_size = corpus.vocab_size
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
            return (f"{mismatch}: prepare the corpus with its tokenizer (python data.py --input PATH --tokenizer "
                    f"{model.trained_on['tokenizer']})")
        if model.cfg.vocab_size < self.vocab_size:
            return (f"it was trained with a vocabulary of {model.cfg.vocab_size} tokens but the corpus has "
                    f"{self.vocab_size}: use a corpus prepared with its tokenizer")
        return None

    def describe(self):
        """What the checkpoint records of the data: the corpus and, to notice a re-preparation, its fingerprint."""
        meta = self.corpus.meta
        return {"name": self.corpus.name, "tokenizer": meta["tokenizer"], "vocab_size": self.vocab_size,
                "tokenizer_sha256": meta.get("tokenizer_sha256"), "fingerprint": self.corpus.fingerprint}

    def state_dict(self):
        return {"data_rng": self.rng.get_state(), "streams": self.streams and self.streams.state_dict()}

    def load_state_dict(self, state):
        self.rng.set_state(state["data_rng"])
        if self.streams is not None:
            self.streams.load_state_dict(state["streams"])


class TaskBatches:
    """Training batches of a synthetic task (tasks.py), and fixed held-out batches whose masked loss (targets -1
    do not count) is the validation loss. next() -> (inputs, targets, restarted = None): no example continues
    another, so tbptt hands states on between examples as state_passing does. A task in words (passkey) records
    its tokenizer as a corpus does (data.tokenizer_identity), so that eval.py's checks of tokens apply."""

    def __init__(self, task, args, seed):
        self.task, self.batch_size, self.vocab_size = task, args.batch_size, task.vocab_size
        text = getattr(task, "tokenizer", None)
        self.tokenizer = {"tokenizer": text and text.name, "tokenizer_sha256": getattr(text, "sha256", None)}
        self.rng = torch.Generator().manual_seed(seed)
        held_out = torch.Generator().manual_seed(2 ** 40 + args.seed)  # the same on every process, unlike rng
        self.val_batches = [task.batch(args.batch_size, held_out) for _ in range(args.eval_seqs)]

    def next(self):
        return (*self.task.batch(self.batch_size, self.rng), None)

    @torch.no_grad()
    def validate(self, model, device, autocast):
        total, count = 0.0, 0
        for inputs, targets in self.val_batches:
            with autocast:
                _, loss, _ = model(inputs.to(device), targets.to(device))
            counted = (targets >= 0).sum().item()  # the positions whose loss counts
            total, count = total + loss.item() * counted, count + counted
        return {"val_loss": total / count}

    def refusal(self, model):
        mismatch = self.tokenizer["tokenizer"] and tokenizer_mismatch(self.tokenizer, model.trained_on)
        if mismatch:  # a tokenizer.json replaced since the model was trained
            return f"{mismatch}: put back the tokenizer the model was trained with"
        if model.cfg.vocab_size < self.vocab_size:
            return f"its vocabulary of {model.cfg.vocab_size} tokens is smaller than the task's {self.vocab_size}"
        return None

    def describe(self):
        return {"name": f"task {self.task.name}", "task": self.task.name, "vocab_size": self.vocab_size,
                **self.tokenizer, "fingerprint": None}

    def state_dict(self):
        return {"data_rng": self.rng.get_state(), "streams": None}

    def load_state_dict(self, state):
        self.rng.set_state(state["data_rng"])


def open_corpus(args, rank, world):
    """load_corpus, with rank 0 preparing a missing default corpus while the others wait; a default corpus whose
    tokenizer cannot be downloaded is told in train.py's terms."""
    if world > 1 and rank > 0:
        dist.barrier()
    try:
        corpus = load_corpus(args.data, args.data_dir)
    except DataError:
        tokenizer = args.data[len(DEFAULT_CORPUS) + 1:]
        if args.data.startswith(DEFAULT_CORPUS + "-") and not (Path(args.data_dir) / args.data).exists():
            try:
                get_tokenizer(tokenizer)
            except DataError:
                raise UsageError(f"the default corpus '{args.data}' needs tiktoken's {tokenizer} vocabulary, which "
                                 f"could not be downloaded (offline?): set TIKTOKEN_CACHE_DIR to a folder holding "
                                 f"tiktoken's cached files, or train on byte tokens (--data {DEFAULT_CORPUS}, as "
                                 f"--preset demo does)") from None
        raise
    if world > 1 and rank == 0:
        dist.barrier()
    return corpus


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------

def estimate_memory(model, args, device, autocast):
    """Bytes one training process needs, at least: 16 per parameter (float32 weights, gradients and AdamW's two
    moments) plus 1.5 times the activations that a micro-batch keeps for its backward pass. Those are measured, not
    modelled: the bytes of the tensors autograd saves while reading one short sequence, per token. The factor is
    what the backward pass holds on top (gradients of activations, allocator slack): beyond the 16 bytes per
    parameter, the peak resident memory of two-step CPU runs of 16 mamba2 and gla models (float32 and bfloat16,
    0.5M to 85M parameters, vocabularies of 257 and 50257) was 1.5 to 2.8 times their saved activations, the most
    with the large vocabulary."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    length = min(args.seq_len, 2 * model.cfg.chunk_size)
    tokens = torch.zeros(1, length, dtype=torch.long, device=device)
    recompute, model.cfg.recompute = model.cfg.recompute, False  # measure what every block would keep
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast:
            model(tokens, tokens)
    finally:
        model.cfg.recompute = recompute
    per_token = sum(saved.values()) / length
    if recompute:  # kept: each block's input; live in the backward pass: one block's activations (and the head's)
        per_token = 4 * model.cfg.d_model * model.cfg.n_layer + 2 * per_token / model.cfg.n_layer
    return 16 * model.num_parameters() + 1.5 * per_token * args.batch_size * args.seq_len


def available_memory(device):
    """Bytes that device could still give: free GPU memory, else the system's available RAM, or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # no /proc (macOS): all of the physical memory, so only a run that could never fit is refused
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(model, args, device, autocast):
    """Refuse, before the first step, a run whose estimate exceeds 90% of what is available: the alternative is an
    out-of-memory error, or on Linux the kernel killing the process without a word."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type != "cuda" else 1  # sharing the RAM
    weights = 4 * model.num_parameters()  # already allocated, so no longer counted as available
    need = (estimate_memory(model, args, device, autocast) - weights) * processes
    free = available_memory(device)
    if free is not None and need > 0.9 * free:
        raise UsageError(f"this run needs about {need / 2**30:.1f} GiB more memory on {device} but "
                         f"{free / 2**30:.1f} GiB are available: lower --batch_size (raising --grad_accum keeps "
                         f"the {args.batch_size * args.grad_accum} sequences per step) or --seq_len")


# ----------------------------------------------------------------------------------------------------------------
# Logging and stopping
# ----------------------------------------------------------------------------------------------------------------

class Progress:
    """What rank 0 shows and keeps of a run: the progress bar, log.jsonl, and the training speed (validation time
    excluded). The other processes keep nothing."""

    def __init__(self, run, last_step):
        args = run.args
        self.run, self.last_step = run, last_step
        self.started, self.train_seconds = time.time(), 0.0
        self.log = open_log(args.out_dir, run.step) if run.is_main else None
        self.bar = tqdm(total=last_step, initial=run.step, disable=not run.is_main, desc=args.init,
                        dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if self.log:
            self.log.close()

    def step(self, loss, lr, seconds):
        step, self.train_seconds = self.run.step, self.train_seconds + seconds
        rate = self.run.tokens * self.run.world / self.train_seconds
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
        if step == self.last_step:
            self.bar.close()  # before the last validation, so the bar's final speed is the training speed
        if self.log and (step % self.run.args.log_interval == 0 or step == self.last_step):
            self._write(step=step, train_loss=loss, lr=lr, tokens_per_s=rate, time=time.time() - self.started)

    def validation(self, losses):
        """Log and show rank 0's validation losses; returns them."""
        if losses is not None:
            self._write(step=self.run.step, **losses)
            self.bar.write(f"step {self.run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
            self.bar.unpause()  # the time spent validating does not count in the bar's speed
        return losses

    def finish(self):
        args = self.run.args
        if not self.run.is_main:
            return
        if self.run.step < args.max_steps:
            print(f"train.py: stopped at step {self.run.step} (--stop_at); continue with python train.py --resume "
                  f"--out_dir {args.out_dir}")
        else:
            print(f"train.py: done: {checkpoint_path(args.out_dir)} (step {self.run.step}); next: python eval.py "
                  f"--ckpt {args.out_dir}")

    def _write(self, **record):
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()


def open_log(out_dir, step):
    """log.jsonl for appending. A fresh run starts a new log; a resumed one keeps only the records up to the
    checkpoint it resumes from (steps trained after it were lost), and drops a line torn by a crash."""
    path = Path(out_dir) / "log.jsonl"
    kept = []
    if step > 0 and path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= step:
                    kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


class Stopped(Exception):
    """The run stopped early at the user's request; the message says how to continue."""


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM during training asks for a stop at the end of the current step, where a
    checkpoint continues the run exactly; another one a second or more later stops at once. requested() is
    collective: every process stops at the same step."""

    def __init__(self, run):
        self.run, self.first = run, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:  # the second request, or a Ctrl-C that came as an exception
            raise Stopped(f"interrupted after step {self.run.step}; stopped without saving: "
                          f"{self.run.what_survives()}") from None

    def _handle(self, signum, frame):
        if self.first is not None and time.monotonic() - self.first > 1:  # torchrun repeats the signal at once
            raise KeyboardInterrupt
        self.first = self.first or time.monotonic()

    def requested(self):
        if self.run.world == 1:
            return self.first is not None
        flag = torch.tensor(float(self.first is not None), device=self.run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


# ----------------------------------------------------------------------------------------------------------------
# Processes and the command line
# ----------------------------------------------------------------------------------------------------------------

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


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    explicit = {a.dest for a in parser._actions
                if any(x == opt or x.startswith(opt + "=") for opt in a.option_strings for x in argv)}
    world = 1
    try:
        check_numbers(args, parser)
        rank, world, device = setup_distributed(args.device)
        if needs_base_run(args):  # the paper's recipe in one command: pre-train the zero-init model first
            if rank == 0:
                print(f"{default_out_dir(args.task, 'zero')} does not exist yet: pre-training it first",
                      file=sys.stderr)
            train(base_run_args(args, explicit), rank, world, device)
        args, base = resolve_args(args, explicit)
        train(args, rank, world, device, base)
    except (UsageError, DataError) as error:
        sys.exit(f"train.py: error: {error}")
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        sys.exit(f"train.py: error: {error.strerror or error}{where}")
    except (Stopped, KeyboardInterrupt) as stop:
        print(f"train.py: {str(stop) or 'interrupted before training began'}", file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def needs_base_run(args):
    """True when the one-command recipe must pre-train out/zero first; an unfinished out/zero is an error."""
    base_run = default_out_dir(args.task, "zero")
    if args.init == "zero" or args.init_from or PRESETS[args.preset].get("init_from") or args.from_scratch \
            or args.resume or reads_text(args.task):
        return False
    if not checkpoint_path(base_run).exists():
        return True
    base = load_checkpoint(base_run, require=("step", "args"))
    if base["step"] < base["args"]["max_steps"]:
        raise UsageError(f"{base_run} stopped at step {base['step']} of {base['args']['max_steps']}: finish it "
                         f"first with python train.py --resume --out_dir {base_run}")
    return False


if __name__ == "__main__":
    main()
