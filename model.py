"""model.py: Mamba-2, Mamba-1 and gated linear attention language models whose recurrent state is explicit.

Read first: Buitrago Ruiz & Gu, "Understanding and Improving Length Generalization in Recurrent Models" (ICML 2025,
arXiv 2507.02782), Sections 2-3 (recurrent models, the unexplored states hypothesis); for the mixers, Dao & Gu,
"Transformers are SSMs" (arXiv 2405.21060), Section 7 (Mamba-2); Gu & Dao, "Mamba" (arXiv 2312.00752), Section 3
(Mamba-1); Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635).

Everything the paper studies is about the recurrent state, so the model exposes it: forward() starts from any State
and returns the State after the last token, and step() advances it one token at a time. Reading a sequence whole,
in uneven pieces that hand the State on, or token by token gives the same outputs (tests/test_model.py).

    model = LM(ModelConfig(vocab_size=257, d_model=128, n_layer=4, mixer="mamba2"))
    logits, loss, state = model(idx, targets, state)       idx (B, L) -> logits (B, L, V); state None: zero
    logits_t, state = model.step(idx_t, state)             idx_t (B,) -> logits_t (B, V), O(1) per token

Every mixer reduces its sequence mixing to scan_kernels.chunked_scan, S_t = S_{t-1} diag(exp(log_decay_t)) + v_t k_t^T,
y_t = S_t q_t, with a decay per head or per key channel:
    mamba2  the official Mamba-2 block: q and k are the projections the Mamba-2 paper calls C and B, v = x * dt,
            log_decay = A * dt per head (A = -exp(A_log), the head's rate), after a short causal convolution whose
            last inputs are part of the state. Parameter names, initialisation and the order of operations follow
            the official Mamba2 module; differences: the convolution state holds the last W - 1 inputs (official: W),
            chunk_size 64 and vocabulary padding 64 by default (official: 256 and 16).
    mamba1  the official Mamba-1 block: a head per inner channel (P = 1), whose decay is dt A per state element.
    gla     gated linear attention: q, k, v projections, an output gate and a forget gate per key channel from a
            low-rank projection (--gate head: one per head; --gate none: plain linear attention, whose state only
            grows, a model that fails beyond its training length by construction).
    deltanet, gated_deltanet  the delta rule, whose transition is not diagonal: beside the core, in delta_rule/.
A new mixer is a class like these plus its entry in MIXERS. Checkpoints: runs/; the official models: pretrained/.

Shape letters: B batch, L length, D d_model, V vocabulary, H heads, P value width per head, N key width per head
(Mamba-2's d_state), G q/k groups (Mamba-2's ngroups), W convolution width, E inner width (Mamba-1's d_inner).
"""
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from scan_kernels import chunked_scan, scan_step

MIXERS = {}  # --mixer NAME -> its class; filled in below the mixer classes (adding a mixer adds one entry)


def option(default, help, choices=None):
    """A configuration field with the help line of its command-line flag --NAME (train.py, eval.py)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    """Everything needed to build an LM; vocab_size, d_model, n_layer and mixer are required. The fields made with
    option() are train.py's model flags; the mixers say which of them they read (Mamba2.flags, ...)."""
    vocab_size: int
    d_model: int = option(MISSING, "width of the residual stream")
    n_layer: int = option(MISSING, "number of blocks")
    mixer: str = option(MISSING, "the sequence mixer of every block", choices=MIXERS)
    # mamba2 and mamba1 (defaults of the official Mamba-2 language models; Mamba-1's are d_state 16)
    d_state: int = option(128, "mamba: N, the state size per head (mamba2) or per channel (mamba1)")
    d_conv: int = 4  # W
    expand: int = option(2, "mamba: inner width / d_model")
    headdim: int = option(64, "mamba2: P, the value width per head")
    ngroups: int = 1  # G
    dt_min: float = option(0.001, "mamba: smallest initial step dt; a head remembers about 1 / (A dt) tokens, so "
                                  "smaller dt means longer memories")
    dt_max: float = option(0.1, "mamba: largest initial step dt")
    dt_init_floor: float = 1e-4
    A_init_range: tuple = (1.0, 16.0)
    # gla (n_heads, expand_k, expand_v: deltanet and gated_deltanet too)
    n_heads: int = option(4, "gla, deltanet, gated_deltanet: number of heads")
    expand_k: float = 0.5  # key width = expand_k * d_model, split over the heads
    expand_v: float = 1.0  # value width = expand_v * d_model
    gate: str = option("channel", "gla: the forget gate: per key channel (GLA's), one per head, or none (plain "
                                  "linear attention)", choices=("channel", "head", "none"))
    gate_temperature: float = option(16.0, "gla: log_decay = logsigmoid(.) / temperature; higher means decays stay "
                                           "closer to 1 (slower forgetting)")
    # blocks
    mlp: Optional[bool] = None  # a SwiGLU MLP after each mixer; None means the mixer's default (off for mamba2)
    mlp_hidden: Optional[int] = None  # the MLP's inner width; None: 8/3 d_model rounded up to 128 (SwiGLU)
    norm_eps: float = 1e-5
    pad_vocab_multiple: int = 64
    tie_embeddings: bool = True  # the output layer is the embedding matrix (False: a weight of its own)
    # how the model is computed (COMPUTATION): these may differ from a checkpoint's without changing the model
    chunk_size: int = option(64, "scan chunk size")
    backend: str = option("auto", "scan implementation (see scan_kernels.chunked_scan)", choices=("auto", "torch", "triton"))
    recompute: bool = option(False, "recompute each block's activations in the backward pass instead of keeping "
                                    "them: a fraction of the memory for about a third more compute")

    COMPUTATION = ("chunk_size", "backend", "recompute")
    POSITIVE = ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "dt_min",
                "dt_max", "dt_init_floor", "n_heads", "expand_k", "expand_v", "gate_temperature", "norm_eps",
                "pad_vocab_multiple", "chunk_size", "mlp_hidden")  # sizes, widths and rates (None: the default)

    def __post_init__(self):
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"unknown {f.name} {value!r}; choose one of {tuple(choices)}")
            if f.name in self.POSITIVE and value is not None and not (math.isfinite(value) and value > 0):
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
        """The fields that say what the model computes (all but COMPUTATION): post-training keeps them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.COMPUTATION}


@dataclass
class State:
    """The model's recurrent state after some prefix: per layer, the SSM state and the convolution state.

    ssm[i]   (B, H, P, N) float32: the memory S of layer i's scan
    conv[i]  (B, conv channels, W - 1): the last W - 1 inputs of layer i's causal convolution (mamba), or None
    """
    ssm: List[torch.Tensor]
    conv: List[Optional[torch.Tensor]] = field(default_factory=list)

    def map(self, fn):
        """A new State with fn applied to every tensor."""
        return State([fn(s) for s in self.ssm], [None if c is None else fn(c) for c in self.conv])

    def detach(self):
        """Cut the gradient history: what truncated backpropagation and state passing hand on."""
        return self.map(torch.Tensor.detach)

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


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight in float32, the rms over groups of group_size channels (default all).  (..., dim)"""

    def __init__(self, dim, eps=1e-5, group_size=None):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float() if self.group_size is None else x.float().unflatten(-1, (-1, self.group_size))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((normed if self.group_size is None else normed.flatten(-2)) * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """The gated MLP of the official Mamba blocks: fc2(a * silu(gate)) with (a, gate) = fc1(x).  (..., D)
    hidden: the inner width, by default about 8/3 d_model (the parameters of a 4 d_model MLP without gate)."""

    residual_projections = ("fc2",)

    def __init__(self, d_model, hidden=None):
        super().__init__()
        hidden = hidden or (int(8 * d_model / 3) + 127) // 128 * 128
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


def scan(cfg, q, k, v, log_decay, ssm_state, one_step):
    """Sequence mixing for a whole block of tokens (chunked_scan) or for one token (scan_step, O(1)).
    q, k (B, L, G, N); v (B, L, H, P); log_decay (B, L, H) or (B, L, H, N) -> y (B, L, H, P), state (B, H, P, N)."""
    if one_step:
        y, state = scan_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], ssm_state)
        return y[:, None], state
    return chunked_scan(q, k, v, log_decay, ssm_state, chunk_size=cfg.chunk_size, backend=cfg.backend)


# ----------------------------------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------------------------------

class Mamba2(nn.Module):
    """The Mamba-2 mixer.  (B, L, D) -> (B, L, D), plus the layer's new (ssm, conv) state.

    What every mixer provides besides forward and zero_state: head_sizes(cfg) -> (P, N); check(cfg) raising
    ValueError for a configuration it cannot build; flags, the ModelConfig options it reads (train.py refuses them
    for another mixer); mlp_by_default; and residual_projections, the names of its layers that write into the
    residual stream (LM scales their initial weights)."""

    flags = ("d_state", "expand", "headdim", "dt_min", "dt_max")
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
        # the output norm, RMSNorm(y * silu(z)) within each group's channels (the gate applied in float32 first)
        self.norm = RMSNorm(self.d_inner, cfg.norm_eps, group_size=self.d_inner // cfg.ngroups)
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
        y, ssm_state = scan(cfg, q.unflatten(-1, (G, N)), k.unflatten(-1, (G, N)),
                            (x * dt[..., None]).to(x.dtype), A * dt, ssm_state, one_step)
        y = (y + x * self.D[:, None].to(x.dtype)).flatten(-2)
        y = self.norm(y.float() * F.silu(z.float())).to(y.dtype)
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

    flags = ("n_heads", "gate", "gate_temperature")
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
        y, ssm_state = scan(self.cfg, q, k, v, log_decay, ssm_state, one_step)
        y = self.g_norm(y) * F.silu(self.g_proj(x)).unflatten(-1, (H, self.head_v_dim))
        return self.o_proj(y.flatten(-2)), ssm_state, None

    def zero_state(self, batch_size, device):
        return (torch.zeros(batch_size, self.cfg.n_heads, self.head_v_dim, self.head_k_dim, device=device), None)


class Mamba1(nn.Module):
    """The Mamba-1 mixer (Gu & Dao 2023, Algorithm 2), with the official module's parameter names.
    (B, L, D) -> (B, L, D), plus the new state.

    Per inner channel d (of E = expand * d_model) and state element n (of N = d_state):
        h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d],   y_t[d] = C_t . h_t[d] + D[d] x_t[d]
    with x the convolved input, dt = softplus(dt_proj(x_proj(x)_dt)) from a low-rank projection (rank ceil(D/16)),
    and B_t, C_t (N) shared by all channels. That is scan_kernels.chunked_scan with a head per channel (H = E, P = 1),
    q = C, k = B, v = dt * x and a decay per key channel, log_decay[d, n] = dt[d] A[d, n]."""

    flags = ("d_state", "expand", "dt_min", "dt_max")
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
        self.dt_proj.bias.keep_init = True  # LM zeroes the other biases
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
        y, ssm_state = scan(self.cfg, q[:, :, None], k[:, :, None], (x * dt).to(x.dtype)[..., None],
                            dt[..., None] * A, ssm_state, one_step)
        y = y[..., 0] + x * self.D.to(x.dtype)  # (B, L, E)
        return self.out_proj(y * F.silu(z)), ssm_state, conv_state

    def zero_state(self, batch_size, device):
        """(ssm (B, E, 1, N) float32, conv (B, E, W - 1))"""
        return (torch.zeros(batch_size, self.d_inner, 1, self.cfg.d_state, device=device),
                torch.zeros(batch_size, self.d_inner, self.cfg.d_conv - 1, device=device))


MIXERS.update(mamba2=Mamba2, mamba1=Mamba1, gla=GatedLinearAttention)
import delta_rule.mixers  # noqa: E402,F401  DeltaNet and Gated DeltaNet (their own scan) add their entries here


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
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)
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
        # The official Mamba language models' initialisation: embeddings N(0, 0.02), biases of linear layers zero,
        # and the projections that write into the residual stream scaled by 1 / sqrt(writes per layer * n_layer),
        # so the residual stream's variance does not grow with depth. Mixer-specific parameters keep their own.
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

    def forward(self, idx, targets=None, state=None, one_step=False):
        """idx (B, L) int64; targets (B, L) or None (-1 entries are ignored); state None means the zero state;
        one_step: read one token (L = 1) with the recurrence's O(1) step (step()). Embedding -> blocks (each reading
        and replacing its part of the state) -> final norm -> logits. Returns logits (B, L, V), the mean
        cross-entropy (or None) and the State after the last token."""
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
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss, State(ssm_states, conv_states)

    def step(self, idx_t, state):
        """One token per row with O(1) work: idx_t (B,) -> logits_t (B, V) and the advanced State."""
        logits, _, state = self(idx_t[:, None], state=state, one_step=True)
        return logits[:, 0], state

    @torch.no_grad()
    def greedy(self, logits, state, new_tokens):
        """Greedy decoding through step(): new_tokens tokens continuing from logits (B, V), the prediction after the
        last token read, and the State there.  Returns (B, new_tokens) int64."""
        tokens = []
        for i in range(new_tokens):
            tokens.append(logits.argmax(-1))
            if i + 1 < new_tokens:
                logits, state = self.step(tokens[-1], state)
        return torch.stack(tokens, dim=1)

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
