"""model.py: Mamba-2, Mamba-1 and gated linear attention language models whose recurrent state is explicit.

Read first: the paper this project reproduces, Buitrago Ruiz & Gu, "Understanding and Improving Length
Generalization in Recurrent Models" (ICML 2025, arXiv 2507.02782), Sections 2-3 (recurrent models and the
unexplored states hypothesis); for the mixers, Dao & Gu, "Transformers are SSMs" (ICML 2024, arXiv 2405.21060),
Section 7 (the Mamba-2 block); Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv
2312.00752), Section 3 (Mamba-1); Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient
Training" (ICML 2024, arXiv 2312.06635), Section 4 (GLA).

Everything the paper studies is about the recurrent state, so the model exposes it: forward() starts from any State
and returns the State after the last token, and step() advances it one token at a time. Reading a sequence whole,
in uneven pieces that hand the State on, or token by token gives the same outputs (tests/test_model.py).

    model = LM(ModelConfig(vocab_size=257, d_model=128, n_layer=4, mixer="mamba2"))
    logits, loss, state = model(idx, targets, state)       idx (B, L) -> logits (B, L, V); state None: zero
    logits_t, state = model.step(idx_t, state)             idx_t (B,) -> logits_t (B, V), O(1) per token

Every mixer reduces its sequence mixing to kernels.chunked_scan, S_t = S_{t-1} diag(exp(log_decay_t)) + v_t k_t^T,
y_t = S_t q_t, with a decay per head or per key channel:
    mamba2  the official Mamba-2 block: q and k are the block's input-dependent projections that the Mamba-2 paper
            calls C and B, v = x * dt, log_decay = A * dt per head, with a short causal convolution before the scan
            whose last inputs are part of the state. Parameter names, initialisation and the order of operations
            follow the official Mamba2 module (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj). Differences:
            the convolution state holds the last W - 1 inputs (the official one keeps W), and the defaults
            chunk_size 64 and vocabulary padding 64 (official: 256 and 16).
    mamba1  the official Mamba-1 block: a head per inner channel (P = 1), whose decay is dt A per state element.
    gla     gated linear attention: q, k, v projections, an output gate and a forget gate per key channel from a
            low-rank projection (--gate head: one per head; --gate none: plain linear attention, whose state only
            grows, a model that fails beyond its training length by construction).

The file reads top to bottom: the configuration, the State, the layers, the mixers, the LM, the memory that training
it needs; then checkpoints (saving and loading this project's models; pretrained.py loads the official ones).

Shape letters: B batch, L length, D d_model, V vocabulary, H heads, P value width per head, N key width per head
(Mamba-2's d_state), G q/k groups (Mamba-2's ngroups), W convolution width, E inner width (Mamba-1's d_inner).
"""
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from cli import UsageError, option
from kernels import BACKENDS, chunked_scan, scan_step, triton_refusal

MIXERS = {}  # --mixer NAME -> its class; filled in below the mixer classes (adding a mixer adds one entry)
GATES = ("channel", "head", "none")
MAMBA2, GLA, MAMBAS = ("mixer", ("mamba2",)), ("mixer", ("gla",)), ("mixer", ("mamba2", "mamba1"))  # only=: the
# mixers an option belongs to (cli.option)


@dataclass
class ModelConfig:
    """Everything needed to build an LM; vocab_size, d_model, n_layer and mixer are required. The fields made with
    option() are train.py's model flags; those marked resume=True say how the model is computed, not what it is,
    so they may differ from a checkpoint's."""
    vocab_size: int
    d_model: int = option(MISSING, "width of the residual stream")
    n_layer: int = option(MISSING, "number of blocks")
    mixer: str = option(MISSING, "the sequence mixer of every block", choices=MIXERS)
    # mamba2 and mamba1 (defaults of the official Mamba-2 language models; Mamba-1's are d_state 16)
    d_state: int = option(128, "mamba: N, the state size per head (mamba2) or per channel (mamba1)", only=MAMBAS)
    d_conv: int = 4  # W
    expand: int = option(2, "mamba: inner width / d_model", only=MAMBAS)
    headdim: int = option(64, "mamba2: P, the value width per head", only=MAMBA2)
    ngroups: int = 1  # G
    dt_min: float = option(0.001, "mamba: smallest initial step dt; a head remembers about 1 / (A dt) tokens, so "
                                  "smaller dt means longer memories", only=MAMBAS)
    dt_max: float = option(0.1, "mamba: largest initial step dt", only=MAMBAS)
    dt_init_floor: float = 1e-4
    A_init_range: tuple = (1.0, 16.0)
    # gla
    n_heads: int = option(4, "gla: number of heads", only=GLA)
    expand_k: float = 0.5  # key width = expand_k * d_model, split over the heads
    expand_v: float = 1.0  # value width = expand_v * d_model
    gate: str = option("channel", "gla: the forget gate: per key channel (GLA's), one per head, or none (plain "
                                  "linear attention)", choices=GATES, only=GLA)
    gate_temperature: float = option(16.0, "gla: log_decay = logsigmoid(.) / temperature; higher means decays stay "
                                           "closer to 1 (slower forgetting)", only=GLA)
    # blocks
    mlp: Optional[bool] = None  # a SwiGLU MLP after each mixer; None means the mixer's default (off for mamba2)
    norm_eps: float = 1e-5
    pad_vocab_multiple: int = 64
    tie_embeddings: bool = True  # the output layer is the embedding matrix (False: a weight of its own)
    # how the model is computed
    chunk_size: int = option(64, "scan chunk size", resume=True, inherit=True)
    backend: str = option("auto", "scan implementation (see kernels.chunked_scan)", choices=BACKENDS, resume=True)
    recompute: bool = option(False, "recompute each block's activations in the backward pass instead of keeping "
                                    "them: a fraction of the memory for about a third more compute", resume=True)

    def __post_init__(self):
        if self.gate == "data":  # what checkpoints written before the per-channel gate call the per-head one
            self.gate = "head"
        for f in fields(self):
            value = getattr(self, f.name)
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} {value!r}; choose one of {tuple(f.metadata['choices'])}")
            if f.type in (int, float) and not (math.isfinite(value) and value > 0):  # every size, width and rate
                raise ValueError(f"{f.name} must be positive; got {value}")
        MIXERS[self.mixer].check(self)
        if self.mlp is None:
            self.mlp = MIXERS[self.mixer].mlp_by_default
        self.A_init_range = tuple(self.A_init_range)

    def head_sizes(self):
        """(P, N): the value and key width of one head, the sizes of each scan state's matrix."""
        return MIXERS[self.mixer].head_sizes(self)

    @property
    def padded_vocab_size(self):
        """Rows of the embedding: a multiple of pad_vocab_multiple, which makes the output matmul faster."""
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def architecture(self):
        """The fields that say what the model computes (all but those marked resume): post-training keeps them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("resume")}

    def to_dict(self):
        return asdict(self)


@dataclass
class State:
    """The model's recurrent state after some prefix: per layer, the SSM state and the convolution state.

    ssm[i]   (B, H, P, N) float32: the memory S of layer i's scan
    conv[i]  (B, conv channels, W - 1): the last W - 1 inputs of layer i's causal convolution (mamba2), or None
    Rows are batch rows, so selecting or reordering rows selects or reorders sequences.
    """
    ssm: List[torch.Tensor]
    conv: List[Optional[torch.Tensor]] = field(default_factory=list)

    def map(self, fn):
        """A new State with fn applied to every tensor."""
        return State([fn(s) for s in self.ssm], [None if c is None else fn(c) for c in self.conv])

    def detach(self):
        """Cut the gradient history: what truncated backpropagation and state passing hand on."""
        return self.map(torch.Tensor.detach)

    def clone(self):
        return self.map(torch.Tensor.clone)

    def select(self, rows):
        """Rows (an index tensor, a list, a slice or a boolean mask) of every tensor, in the given order."""
        return self.map(lambda t: t[rows])

    def to(self, device=None, dtype=None):
        """Move to a device; dtype (if given) applies to the SSM states, which are float32 by default. Convolution
        states keep their dtype (that of the activations: bfloat16 under autocast)."""
        return State([s.to(device=device, dtype=dtype or s.dtype) for s in self.ssm],
                     [None if c is None else c.to(device=device) for c in self.conv])

    def zero_rows(self, rows):
        """The same State with the given rows (a boolean mask (B,) or indices) reset to the zero state."""
        def zeroed(t):
            t = t.clone()
            t[rows] = 0
            return t
        return self.map(zeroed)

    @property
    def batch_size(self):
        return self.ssm[0].shape[0]

    @property
    def device(self):
        return self.ssm[0].device

    def as_dict(self):
        """Plain tensors in lists, which torch.load(weights_only=True) accepts."""
        return {"ssm": list(self.ssm), "conv": list(self.conv)}

    @classmethod
    def from_dict(cls, d):
        return cls(list(d["ssm"]), list(d["conv"]))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in float32.  (..., dim) -> (..., dim)"""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(x * silu(z)), normalised within groups of group_size channels.
    x, z (..., dim) -> (..., dim)"""

    def __init__(self, dim, group_size, eps=1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z):
        # the gate is applied in float32, as the official kernel does
        gated = (x.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """The gated MLP of the official Mamba blocks: fc2(a * silu(gate)) with (a, gate) = fc1(x).  (..., D)"""

    residual_projections = ("fc2",)

    def __init__(self, d_model):
        super().__init__()
        hidden = (int(8 * d_model / 3) + 127) // 128 * 128
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        a, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * F.silu(gate))


def causal_conv(x, weight, bias, conv_state):
    """Depthwise causal convolution that continues from the previous inputs held in conv_state.

    x (B, L, C); weight (C, 1, W); bias (C,); conv_state (B, C, W - 1) or None (zeros: the sequence starts here).
    Returns the output (B, L, C) and the new conv_state (B, C, W - 1), the last W - 1 inputs seen.
    """
    B, L, C = x.shape
    W = weight.shape[-1]
    x = x.transpose(1, 2)  # (B, C, L)
    if conv_state is None:
        conv_state = x.new_zeros(B, C, W - 1)
    extended = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (B, C, W - 1 + L)
    out = F.conv1d(extended, weight, bias, groups=C)  # (B, C, L): no padding, the state is the left context
    # a copy, not a view: a view would keep the whole (B, C, W - 1 + L) input alive inside the state
    return out.transpose(1, 2), extended[:, :, extended.shape[-1] - (W - 1):].clone()


def _scan(cfg, q, k, v, log_decay, ssm_state, one_step):
    """Sequence mixing for a whole block of tokens (chunked_scan) or for one token (scan_step, O(1)).
    q, k (B, L, G, N); v (B, L, H, P); log_decay (B, L, H) -> y (B, L, H, P), final state (B, H, P, N)."""
    if one_step:
        y, state = scan_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], ssm_state)
        return y[:, None], state
    return chunked_scan(q, k, v, log_decay, ssm_state, chunk_size=cfg.chunk_size, backend=cfg.backend)


# ----------------------------------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------------------------------

class Mamba2(nn.Module):
    """The Mamba-2 mixer.  (B, L, D) -> (B, L, D), plus the layer's new (ssm, conv) state.

    What every mixer provides besides forward and zero_state: head_sizes(cfg) -> (P, N), check(cfg) raising
    ValueError for a configuration it cannot build, mlp_by_default, and residual_projections, the names of its
    layers that write into the residual stream (LM._init_weights scales them)."""

    residual_projections = ("out_proj",)
    mlp_by_default = False

    @staticmethod
    def head_sizes(cfg):
        return cfg.headdim, cfg.d_state

    @staticmethod
    def check(cfg):
        if (cfg.expand * cfg.d_model) % cfg.headdim:
            raise ValueError(f"expand * d_model = {cfg.expand * cfg.d_model} must be a multiple of "
                             f"headdim = {cfg.headdim}")
        if ((cfg.expand * cfg.d_model) // cfg.headdim) % cfg.ngroups:
            raise ValueError(f"the number of heads must be a multiple of ngroups = {cfg.ngroups}")
        if cfg.dt_min > cfg.dt_max:
            raise ValueError(f"dt_min = {cfg.dt_min} is above dt_max = {cfg.dt_max}")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.d_inner = cfg.expand * cfg.d_model
        self.nheads = self.d_inner // cfg.headdim
        self.conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.d_state  # x, B and C all pass the convolution
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner + 2 * cfg.ngroups * cfg.d_state + self.nheads,
                                 bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=True)
        # dt = softplus(dt_raw + dt_bias) starts log-uniform in [dt_min, dt_max]: dt_bias = softplus^-1(dt)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) uniform in -A_init_range: per-head decay rates from slow to fast
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*cfg.A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))  # skip connection around the scan
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // cfg.ngroups, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(self, u, ssm_state=None, conv_state=None, one_step=False):
        """u (B, L, D); ssm_state (B, H, P, N) or None; conv_state (B, conv_dim, W - 1) or None."""
        cfg = self.cfg
        G, N, P = cfg.ngroups, cfg.d_state, cfg.headdim
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC, conv_state = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias, conv_state)
        x, k, q = F.silu(xBC).split([self.d_inner, G * N, G * N], dim=-1)  # the paper's x, B and C
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, H), float32: it sets the decay
        A = -torch.exp(self.A_log.float())  # (H,)
        x = x.unflatten(-1, (self.nheads, P))  # (B, L, H, P)
        y, ssm_state = _scan(cfg, q.unflatten(-1, (G, N)), k.unflatten(-1, (G, N)),
                             (x * dt[..., None]).to(x.dtype), A * dt, ssm_state, one_step)
        y = y + x * self.D[:, None].to(x.dtype)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y), ssm_state, conv_state

    def zero_state(self, batch_size, device):
        """(ssm (B, H, P, N) float32, conv (B, conv_dim, W - 1))"""
        return (torch.zeros(batch_size, self.nheads, self.cfg.headdim, self.cfg.d_state, device=device),
                torch.zeros(batch_size, self.conv_dim, self.cfg.d_conv - 1, device=device))


class GatedLinearAttention(nn.Module):
    """Gated linear attention (Yang et al. 2024), as the paper trains it.  (B, L, D) -> (B, L, D), plus the state.

    S_t = S_{t-1} diag(alpha_t) + v_t k_t^T,  y_t = S_t q_t,  out = o_proj(RMSNorm(y) * silu(g_proj(x)))  per head,
    with the forget gate log alpha_t = logsigmoid(x_t W_1 W_2 + b) / gate_temperature (flash-linear-attention's
    gate_logit_normalizer, 16). --gate says what the gate is:
        channel  GLA's: a vector over the key channels from a low-rank (16) projection  log_decay (B, L, H, N)
        head     one scalar per head (the recurrence of Mamba-2 and of "simple GLA")    log_decay (B, L, H)
        none     plain linear attention: nothing is ever forgotten, the state only grows
    Parameter names are flash-linear-attention's GatedLinearAttention layer's (q_proj, k_proj, v_proj, gk_proj,
    g_proj, g_norm, o_proj), so that a reader can compare."""

    residual_projections = ("o_proj",)
    mlp_by_default = True
    gate_rank = 16  # the low-rank dimension of the per-channel gate

    @staticmethod
    def head_sizes(cfg):
        return int(cfg.expand_v * cfg.d_model) // cfg.n_heads, int(cfg.expand_k * cfg.d_model) // cfg.n_heads

    @staticmethod
    def check(cfg):
        for name, width in (("key", cfg.expand_k * cfg.d_model), ("value", cfg.expand_v * cfg.d_model)):
            if width != int(width) or int(width) % cfg.n_heads:
                raise ValueError(f"the {name} width {width} must be an integer multiple of n_heads = {cfg.n_heads}")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.key_dim, self.value_dim = int(cfg.expand_k * cfg.d_model), int(cfg.expand_v * cfg.d_model)
        self.head_v_dim, self.head_k_dim = cfg.head_sizes()  # P, N
        self.q_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        if cfg.gate == "channel":
            self.gk_proj = nn.Sequential(nn.Linear(cfg.d_model, self.gate_rank, bias=False),
                                         nn.Linear(self.gate_rank, self.key_dim, bias=True))
        else:
            self.gk_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=True) if cfg.gate == "head" else None
        self.g_proj = nn.Linear(cfg.d_model, self.value_dim, bias=False)  # output gate
        self.g_norm = RMSNorm(self.head_v_dim, eps=cfg.norm_eps)  # per head, shared across heads
        self.o_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)

    def forward(self, x, ssm_state=None, conv_state=None, one_step=False):
        """x (B, L, D); ssm_state (B, H, P, N) or None; conv_state is unused (None)."""
        H, N = self.cfg.n_heads, self.head_k_dim
        q = self.q_proj(x).unflatten(-1, (H, N)) * N ** -0.5  # (B, L, H, N)
        k = self.k_proj(x).unflatten(-1, (H, N))
        v = self.v_proj(x).unflatten(-1, (H, self.head_v_dim))  # (B, L, H, P)
        if self.gk_proj is None:  # plain linear attention: nothing is ever forgotten
            log_decay = torch.zeros(*x.shape[:2], H, device=x.device)
        else:  # the temperature keeps initial decays close to 1 (long memories), as in GLA
            log_decay = F.logsigmoid(self.gk_proj(x).float()) / self.cfg.gate_temperature
            if self.cfg.gate == "channel":
                log_decay = log_decay.unflatten(-1, (H, N))  # (B, L, H, N): a decay per key channel
        y, ssm_state = _scan(self.cfg, q, k, v, log_decay, ssm_state, one_step)
        y = self.g_norm(y) * F.silu(self.g_proj(x)).unflatten(-1, (H, self.head_v_dim))
        return self.o_proj(y.flatten(-2)), ssm_state, None

    def zero_state(self, batch_size, device):
        return (torch.zeros(batch_size, self.cfg.n_heads, self.head_v_dim, self.head_k_dim, device=device), None)


class Mamba1(nn.Module):
    """The Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
    Algorithm 2), with the official module's parameter names.  (B, L, D) -> (B, L, D), plus the new state.

    Per inner channel d (of E = expand * d_model) and state element n (of N = d_state):
        h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d],   y_t[d] = C_t . h_t[d] + D[d] x_t[d]
    with x the convolved input, dt = softplus(dt_proj(x_proj(x)_dt)) from a low-rank projection (rank ceil(D/16)),
    and B_t, C_t (N) shared by all channels. That is kernels.chunked_scan with a head per channel (H = E, P = 1),
    q = C, k = B, v = dt * x and a decay per key channel, log_decay[d, n] = dt[d] A[d, n]."""

    residual_projections = ("out_proj",)
    mlp_by_default = False

    @staticmethod
    def head_sizes(cfg):
        return 1, cfg.d_state

    @staticmethod
    def check(cfg):
        if cfg.dt_min > cfg.dt_max:
            raise ValueError(f"dt_min = {cfg.dt_min} is above dt_max = {cfg.dt_max}")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.d_inner, N = cfg.expand * cfg.d_model, cfg.d_state
        self.dt_rank = math.ceil(cfg.d_model / 16)
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, cfg.d_conv, groups=self.d_inner, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # dt_proj's weight keeps the variance of dt_rank inputs; its bias makes softplus(bias) log-uniform in
        # [dt_min, dt_max] (bias = softplus^-1(dt)), as in the official initialisation
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias.keep_init = True  # LM._init_weights zeroes other biases
        # A = -exp(A_log) = -(1, 2, ..., N) in every channel: S4D's real initialisation
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))  # skip connection around the scan
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(self, u, ssm_state=None, conv_state=None, one_step=False):
        """u (B, L, D); ssm_state (B, E, 1, N) or None; conv_state (B, E, W - 1) or None."""
        N = self.cfg.d_state
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, E) each
        x, conv_state = causal_conv(x, self.conv1d.weight, self.conv1d.bias, conv_state)
        x = F.silu(x)
        dt, k, q = self.x_proj(x).split([self.dt_rank, N, N], dim=-1)  # the paper's dt, B and C
        dt = F.softplus(self.dt_proj(dt).float())  # (B, L, E), float32: it sets the decay
        A = -torch.exp(self.A_log.float())  # (E, N)
        y, ssm_state = _scan(self.cfg, q[:, :, None], k[:, :, None], (x * dt).to(x.dtype)[..., None],
                             dt[..., None] * A, ssm_state, one_step)
        y = y[..., 0] + x * self.D.to(x.dtype)  # (B, L, E)
        return self.out_proj(y * F.silu(z)), ssm_state, conv_state

    def zero_state(self, batch_size, device):
        """(ssm (B, E, 1, N) float32, conv (B, E, W - 1))"""
        return (torch.zeros(batch_size, self.d_inner, 1, self.cfg.d_state, device=device),
                torch.zeros(batch_size, self.d_inner, self.cfg.d_conv - 1, device=device))


MIXERS.update(mamba2=Mamba2, mamba1=Mamba1, gla=GatedLinearAttention)


# ----------------------------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then optionally x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MIXERS[cfg.mixer](cfg)
        if cfg.mlp:
            self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.mlp = SwiGLU(cfg.d_model)
        else:
            self.mlp = None

    def forward(self, x, ssm_state, conv_state, one_step):
        mixed, ssm_state, conv_state = self.mixer(self.norm(x), ssm_state, conv_state, one_step)
        x = x + mixed
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, ssm_state, conv_state


class LM(nn.Module):
    """Embedding, n_layer blocks, final norm and an output layer (tied to the embedding unless
    cfg.tie_embeddings is False).  idx (B, L) -> logits (B, L, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.ModuleDict(dict(
            embedding=nn.Embedding(cfg.padded_vocab_size, cfg.d_model),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm_f=RMSNorm(cfg.d_model, eps=cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._init_weights()

    def _init_weights(self):
        """The official Mamba language models' scheme: embeddings N(0, 0.02), biases of linear layers zero, and the
        projections that write into the residual stream scaled by 1 / sqrt(writes per layer * n_layer), so the
        residual stream's variance does not grow with depth. Mixer-specific parameters keep their own init."""
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        writes = 2 if self.cfg.mlp else 1
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not hasattr(module.bias, "keep_init"):
                nn.init.zeros_(module.bias)
            for name in getattr(module, "residual_projections", ()):
                weight = getattr(module, name).weight
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                with torch.no_grad():
                    weight /= math.sqrt(writes * self.cfg.n_layer)

    def init_state(self, batch_size, device=None):
        """The zero State for batch_size rows."""
        device = device or self.backbone.embedding.weight.device
        ssm, conv = zip(*(block.mixer.zero_state(batch_size, device) for block in self.backbone.layers))
        return State(list(ssm), list(conv))

    def _run(self, idx, state, one_step):
        """Embedding -> blocks (each reading and replacing its part of the state) -> final norm -> logits."""
        B, L = idx.shape
        if state is not None and state.batch_size != B:
            raise ValueError(f"the state holds {state.batch_size} rows but the input has {B}")
        x = self.backbone.embedding(idx)
        ssm_states, conv_states = [], []
        for i, block in enumerate(self.backbone.layers):
            ssm_in = None if state is None else state.ssm[i]
            conv_in = None if state is None else state.conv[i]
            if self.cfg.recompute and torch.is_grad_enabled():
                x, ssm_out, conv_out = torch.utils.checkpoint.checkpoint(block, x, ssm_in, conv_in, one_step,
                                                                         use_reentrant=False)
            else:
                x, ssm_out, conv_out = block(x, ssm_in, conv_in, one_step)
            ssm_states.append(ssm_out)
            conv_states.append(conv_out)
        x = self.backbone.norm_f(x)
        logits = F.linear(x, self.lm_head.weight[:self.cfg.vocab_size])  # the padding rows are not tokens
        return logits, State(ssm_states, conv_states)

    def forward(self, idx, targets=None, state=None):
        """idx (B, L) int64; targets (B, L) or None (-1 entries are ignored); state None means the zero state.
        Returns logits (B, L, V), the mean cross-entropy (or None) and the State after the last token."""
        logits, state = self._run(idx, state, one_step=False)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss, state

    def step(self, idx_t, state):
        """One token per row with O(1) work: idx_t (B,) -> logits_t (B, V) and the advanced State."""
        logits, state = self._run(idx_t[:, None], state, one_step=True)
        return logits[:, 0], state

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, state=None):
        """Continue idx (B, L) by sampling max_new_tokens tokens through step(). temperature 0 means greedy.
        Returns (B, L + max_new_tokens)."""
        logits, _, state = self(idx, state=state)
        logits = logits[:, -1]
        out = [idx]
        for i in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k)
            out.append(next_token[:, None])
            if i + 1 < max_new_tokens:
                logits, state = self.step(next_token, state)
        return torch.cat(out, dim=1)

    def read(self, tokens, chunk_len, state=None, stops=(), progress=None):
        """Read tokens (B, L) chunk_len at a time from state (None: the zero state), handing the State on, so memory
        does not grow with L. Pieces also end at every position in stops (to look at the state there); progress
        (a tqdm bar, say) is told the tokens of each piece.
        Yields (start, end, logits (B, end - start, V), State after token end - 1) for each piece in order; a
        consumer that keeps only what it needs of each piece's logits holds one piece at a time."""
        ends = sorted({*range(chunk_len, tokens.shape[1], chunk_len), *(s for s in stops if 0 < s < tokens.shape[1]),
                       tokens.shape[1]})
        start = 0
        for end in ends:
            logits, _, state = self(tokens[:, start:end], state=state)
            if progress is not None:
                progress.update(tokens.shape[0] * (end - start))
            yield start, end, logits, state
            start = end

    def loss_per_position(self, tokens, chunk_len, state=None, progress=None):
        """Next-token loss at every position of tokens (B, L + 1), read chunk_len tokens at a time from state (None:
        zero).  Returns (B, L) float32 on the CPU, filled in place: small pieces kept alive between the large
        temporaries of each pass would fragment the heap, and the process would grow with L."""
        losses = torch.empty(tokens.shape[0], tokens.shape[1] - 1)
        for start, end, logits, _ in self.read(tokens[:, :-1], chunk_len, state, progress=progress):
            losses[:, start:end] = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, start + 1:end + 1],
                                                   reduction="none")
        return losses

    def num_parameters(self):
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def save(self, path, **extra):
        """Write this model (configuration and weights) plus any extra entries as a checkpoint, atomically."""
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model_config": self.cfg.to_dict(),
                               "model": self.state_dict(), **extra})

    @classmethod
    def from_checkpoint(cls, checkpoint, device="cpu", **overrides):
        """The LM a checkpoint of this project holds, in eval mode. checkpoint: a path (file or run folder) or a dict
        from load_checkpoint. overrides: fields marked resume (backend, chunk_size, recompute); None keeps the saved
        value. model.trained_on says what it was trained on (tokenizer, training length T, corpus)."""
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        try:
            cfg = ModelConfig(**{**ckpt["model_config"], **{k: v for k, v in overrides.items() if v is not None}})
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"the checkpoint's model does not match this code ({error})") from None
        model = build(cfg, ckpt["model"], "the checkpoint")
        corpus, args = ckpt.get("corpus") or {}, ckpt.get("args") or {}
        model.trained_on = {"tokenizer": corpus.get("tokenizer"), "tokenizer_sha256": corpus.get("tokenizer_sha256"),
                            "seq_len": args.get("seq_len"), "corpus": corpus.get("name"),
                            "source": str(checkpoint_path(checkpoint)) if ckpt is not checkpoint else "a checkpoint"}
        return model.to(device).eval()

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", **overrides):
        """A trained LM in eval mode, from any of: a checkpoint of this project (file or run folder); a Hugging Face
        hub name of an official Mamba-2 (state-spaces/mamba2-370m); a folder with config.json and the weights in
        either public layout (pretrained.py, imported only here). is_checkpoint() decides which."""
        if is_checkpoint(name_or_path):
            return cls.from_checkpoint(name_or_path, device, **overrides)
        import pretrained

        return pretrained.load_pretrained(str(name_or_path), device, **overrides)


def sample(logits, temperature=1.0, top_k=None):
    """One token per row from logits (B, V): greedy when temperature is 0, else softmax(logits / temperature)
    restricted to the top_k most likely tokens when top_k is given.  Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)[:, 0]


def training_memory(cfg, tokens, compute_dtype=torch.float32):
    """Bytes that training cfg on micro-batches of `tokens` tokens needs, at least: 16 per parameter (float32
    weights, gradients and AdamW's two moments) and 1.5 times the activations autograd keeps for the backward pass
    (the factor covers what the backward pass holds on top; RESULTS.md gives its calibration). The activations are
    measured, not modelled, on the meta device, where nothing is allocated: what autograd saves while models of one
    and of two blocks read a short sequence, extrapolated to n_layer blocks (every block is alike), so even a model
    far too large for the machine is estimated in a moment. Under bfloat16 autocast the meta models are bfloat16,
    plus the 2 bytes per parameter of the weights' bfloat16 copies that autocast keeps."""
    length = 2 * cfg.chunk_size
    (params_1, saved_1), (params_2, saved_2) = (_saved_by(cfg, n, length, compute_dtype) for n in (1, 2))
    params, per_layer = params_1 + (params_2 - params_1) * (cfg.n_layer - 1), (saved_2 - saved_1) / length
    outside = saved_1 / length - per_layer  # embedding, final norm, logits
    if cfg.recompute:  # kept: each block's input; live in the backward pass: one block's activations
        per_token = outside + 4 * cfg.d_model * cfg.n_layer + 2 * per_layer
    else:
        per_token = outside + per_layer * cfg.n_layer
    copies = 2 * params if compute_dtype == torch.bfloat16 else 0
    return 16 * params + copies + 1.5 * per_token * tokens


def _saved_by(cfg, n_layer, length, compute_dtype):
    """(parameters, bytes autograd saves) of a model like cfg with n_layer blocks reading one sequence of length
    tokens, on the meta device."""
    from torch.multiprocessing.reductions import StorageWeakRef  # names a storage, even on the meta device

    with torch.device("meta"):
        model = LM(replace(cfg, n_layer=n_layer, recompute=False, backend="torch")).to(compute_dtype)
    weights = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    saved = {}

    def keep(tensor):
        key = StorageWeakRef(tensor.untyped_storage()).cdata
        if key not in weights:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    tokens = torch.zeros(1, length, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(tokens, tokens)
    return model.num_parameters(), sum(saved.values())


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, never with a number that is not finite, read without running code
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "lengen-checkpoint-v1"


class CheckpointError(UsageError):
    """A checkpoint that cannot be read or written; the message says what to do."""


def is_checkpoint(spec):
    """The one rule for what a model argument names: a checkpoint of this project (a .pt file or a run folder,
    existing or not, whenever the path or its parent folder exists here), or else something for pretrained.py (a
    folder with config.json, or a Hugging Face hub name such as state-spaces/mamba2-370m)."""
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return False
    return path.exists() or path.parent.is_dir()


def checkpoint_path(path):
    """The file a checkpoint argument stands for: a run folder (or a name without a suffix) means its ckpt.pt."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() or not path.suffix else path


def first_nonfinite(obj, name=""):
    """The dotted name of the first floating-point tensor inside obj (nested dicts, lists, tuples) that holds a NaN
    or an infinity, or None. Checks the weights, and also the optimizer's moments and the intervention's states:
    a non-finite moment would silently freeze its parameter after a resume."""
    if isinstance(obj, torch.Tensor):
        return name or "tensor" if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = first_nonfinite(value, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


def save_checkpoint(path, payload):
    """Write payload (a dict with the weights under "model") to path atomically: to a temporary file, synced to disk,
    then renamed, so a reader or a crash never sees half a file. A payload holding a number that is not finite is
    refused, so a good checkpoint is never replaced by a broken one."""
    path = checkpoint_path(path)
    broken = first_nonfinite(payload)
    if broken:
        raise CheckpointError(f"not saving {path}: {broken} is not finite")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a writer that was killed
        if not process_alive(stale.name.rsplit("-", 1)[-1]):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def process_alive(pid):
    """Whether the process with this id (an int or a string of digits) is running; anything else counts as alive,
    so that nothing is taken from a process that might still use it."""
    pid = str(pid)
    if not pid.isdigit() or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        pass
    return True


def load_checkpoint(path, require=("model_config", "model")):
    """A checkpoint of this project as a dict, read with weights_only=True (loading it cannot run code) and
    checked: its format, the keys in require, and that every number in it is finite."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py) or give another path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated files and foreign pickles fail in many ways
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}): it may be truncated "
                              f"or not from this project; delete it or give another path") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format {CHECKPOINT_FORMAT})")
    missing = [key for key in require if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is incomplete (no {', '.join(missing)}): it was not written by train.py; "
                              f"give another checkpoint")
    broken = first_nonfinite(ckpt)
    if broken:
        raise CheckpointError(f"{path}: {broken} is not finite, so the checkpoint cannot be used; give another")
    return ckpt


def build(cfg, weights, where):
    """An LM of configuration cfg holding weights ({name: tensor}), float32 on the CPU; where names the weights'
    source in errors. Nothing is allocated before the weights are known to fit cfg: the layer count is compared
    first (a config can claim a million layers), then the model is built on the meta device, its tensor names and
    shapes compared with the weights, and the weights adopted (load_state_dict(assign=True))."""
    layers = {int(name.split(".")[2]) for name in weights if name.startswith("backbone.layers.")}
    if layers != set(range(cfg.n_layer)):
        raise CheckpointError(f"{where} holds {len(layers)} layers but its configuration says n_layer = "
                              f"{cfg.n_layer}: it is damaged or not what it claims to be")
    with torch.device("meta"):
        model = LM(cfg)
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name} (model.py has no such part)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, its configuration "
                                  f"implies {tuple(expected[name].shape)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor {name} holds values that are not finite floating-point numbers")
    missing = [name for name in expected if name not in weights]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]}")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    if cfg.tie_embeddings:  # assign gave the output layer a parameter of its own: tie it again
        model.lm_head.weight = model.backbone.embedding.weight
    return model


def check_backend(cfg, device, compute_dtype):
    """A one-line error now rather than a traceback at the first step when --backend triton cannot run."""
    if cfg.backend != "triton":
        return
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--backend triton needs a CUDA device; use --backend torch (or auto) on the CPU")
    refusal = triton_refusal(*cfg.head_sizes(), cfg.chunk_size, compute_dtype, device)
    if refusal:
        raise UsageError(f"--backend triton: {refusal}; or use --backend auto")
