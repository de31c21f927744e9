"""delta_rule/mixers.py: DeltaNet and Gated DeltaNet as mixers of model.LM, with flash-linear-attention's names.

Read first: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv
2406.06484), Section 3 (DeltaNet), and Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(arXiv 2412.06464), Section 3 (Gated DeltaNet). Both mixers compute, per head, from the normalised input x_t:

    q_t, k_t, v_t = silu(causal_conv(x_t W_q)), ..., ...   a short depthwise convolution (width d_conv) of each
    q_t, k_t     <- q_t / ||q_t||, k_t / ||k_t||           L2-normalised (so that the erase step is a projection)
    beta_t        = sigmoid(x_t W_b)                        one writing strength per head
    alpha_t       = exp(-exp(A_log) softplus(x_t W_a + dt_bias))      Gated DeltaNet only; DeltaNet: alpha_t = 1
    S_t           = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   y_t = S_t q_t N^-1/2
    out_t         = W_o RMSNorm(y_t)                        DeltaNet
    out_t         = W_o (RMSNorm(y_t) * silu(x_t W_g))      Gated DeltaNet: an output gate, as GLA's

The gate alpha_t is Mamba-2's per-head decay exp(A dt) with dt = softplus(x W_a + dt_bias); the scale N^-1/2 of the
read-out is flash-linear-attention's default. The recurrence runs in delta_rule/scan.py (chunked_delta_rule for a
sequence, delta_rule_step for one token); its state S (B, H, P, N) is the State's ssm entry, as for every other
mixer, and the last d_conv - 1 inputs of the three convolutions, stacked (B, 2 K + V, W - 1), its conv entry, so
interventions, eval.py's diagnostics and post-training apply unchanged.

Parameter names are those of flash-linear-attention's DeltaNet and GatedDeltaNet layers (fla/layers/delta_net.py,
fla/layers/gated_deltanet.py): q_proj, k_proj, v_proj, b_proj, q_conv1d, k_conv1d, v_conv1d, o_norm, o_proj, and
for Gated DeltaNet a_proj, A_log, dt_bias, g_proj; pretrained/fla.py loads their checkpoints by these names. Sizes
are model.py's: n_heads heads, key width K = expand_k * d_model and value width V = expand_v * d_model split over
them. What these mixers leave out of fla's layers (refused by pretrained/fla.py): an output gate on DeltaNet, no
convolution, other feature maps or norms of q and k, beta in [0, 2] (allow_neg_eigval), more value heads than key
heads, convolution biases. The delta rule has a PyTorch path only: --backend triton is refused.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from delta_rule.scan import chunked_delta_rule, delta_rule_step
from model import MIXERS, GatedLinearAttention, RMSNorm, causal_conv

L2_EPS = 1e-6  # fla's l2norm: x / sqrt(sum(x^2) + 1e-6), not max(||x||, eps) as F.normalize


def l2_normalise(x):
    """x / sqrt(||x||^2 + 1e-6) over the last dimension, in float32.  (..., N)"""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


class DeltaNet(nn.Module):
    """DeltaNet (Yang et al. 2024): the delta rule without a gate.  (B, L, D) -> (B, L, D), plus the new state."""

    flags = ("n_heads",)
    residual_projections = ("o_proj",)
    mlp_by_default = True

    @staticmethod
    def head_sizes(cfg):
        return GatedLinearAttention.head_sizes(cfg)  # (P, N): the value and key width per head, as GLA's

    @staticmethod
    def check(cfg):
        GatedLinearAttention.check(cfg)  # key and value widths that split evenly over the heads
        if cfg.backend == "triton":
            raise ValueError("--backend triton: the delta rule has no Triton kernel (delta_rule/scan.py is PyTorch); "
                             "use --backend auto or torch")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.head_v_dim, self.head_k_dim = cfg.head_sizes()  # P, N
        self.key_dim, self.value_dim = cfg.n_heads * self.head_k_dim, cfg.n_heads * self.head_v_dim  # K, V
        self.q_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        self.b_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        # fla's ShortConvolution: a depthwise causal convolution without bias, each of q, k, v its own
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            nn.Conv1d(width, width, cfg.d_conv, groups=width, bias=False)
            for width in (self.key_dim, self.key_dim, self.value_dim))
        self.o_norm = RMSNorm(self.head_v_dim, eps=cfg.norm_eps)  # per head, shared across heads
        self.o_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)

    def log_decay(self, x):
        """log alpha_t (B, L, H), or None: DeltaNet never forgets but by overwriting."""
        return None

    def output(self, y, x):
        """What the heads' read-outs y (B, L, H, P) become before o_proj."""
        return self.o_norm(y)

    def forward(self, x, ssm_state=None, conv_state=None, one_step=False):
        """x (B, L, D); ssm_state (B, H, P, N) or None; conv_state (B, 2 K + V, W - 1) or None."""
        H, N, P = self.cfg.n_heads, self.head_k_dim, self.head_v_dim
        # the three convolutions are one depthwise convolution over the stacked channels: one call, one state
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])
        qkv, conv_state = causal_conv(qkv, weight, None, conv_state)
        q, k, v = F.silu(qkv).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalise(q.unflatten(-1, (H, N))) * N ** -0.5  # (B, L, H, N), float32
        k = l2_normalise(k.unflatten(-1, (H, N)))
        v = v.unflatten(-1, (H, P))  # (B, L, H, P)
        beta = torch.sigmoid(self.b_proj(x).float())  # (B, L, H)
        log_decay = self.log_decay(x)
        if one_step:
            y, ssm_state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0],
                                           None if log_decay is None else log_decay[:, 0], ssm_state)
            y = y[:, None]
        else:
            y, ssm_state = chunked_delta_rule(q, k, v, beta, log_decay, ssm_state, chunk_size=self.cfg.chunk_size)
        return self.o_proj(self.output(y, x).flatten(-2)), ssm_state, conv_state

    def zero_state(self, batch_size, device):
        """(ssm (B, H, P, N) float32, conv (B, 2 K + V, W - 1))"""
        return (torch.zeros(batch_size, self.cfg.n_heads, self.head_v_dim, self.head_k_dim, device=device),
                torch.zeros(batch_size, 2 * self.key_dim + self.value_dim, self.cfg.d_conv - 1, device=device))


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (Yang et al. 2025): DeltaNet with Mamba-2's per-head decay and GLA's output gate."""

    def __init__(self, cfg):
        super().__init__(cfg)
        H = cfg.n_heads
        self.a_proj = nn.Linear(cfg.d_model, H, bias=False)
        # fla's initialisation: A uniform in (0, 16), dt log-uniform in [0.001, 0.1] through dt_bias = softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(0, 16)))
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.g_proj = nn.Linear(cfg.d_model, self.value_dim, bias=False)  # output gate

    def log_decay(self, x):
        """log alpha_t = -exp(A_log) softplus(x W_a + dt_bias): (B, L, H), float32, <= 0."""
        return -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())

    def output(self, y, x):
        return self.o_norm(y) * F.silu(self.g_proj(x)).unflatten(-1, (self.cfg.n_heads, self.head_v_dim))


MIXERS.update(deltanet=DeltaNet, gated_deltanet=GatedDeltaNet)
