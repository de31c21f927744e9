"""scan_kernels.py: the chunked scan of a gated linear recurrence, with an initial and a final state.

Every sequence mixer in this project is the same recurrence. Per batch row and head, with a state S of shape (P, N):

    S_t = exp(log_decay_t) * S_{t-1} + v_t k_t^T          (decay the memory, then write v_t at key k_t)
    y_t = S_t q_t                                         (read the memory with query q_t)
    S_{-1} = initial_state  (zeros when None)             final_state = S_{L-1}

The decay, log_decay <= 0, comes in two kinds:
    scalar       (B, L, H): one number per head and step decays the whole state. Mamba-2 (its step size times a
                 negative per-head rate; model.py spells it out in Mamba-2's own letters) and linear attention with
                 a scalar forget gate.
    per channel  (B, L, H, N): column n of the state, the one key channel n writes, decays by its own
                 exp(log_decay_t[n]). GLA's forget gate, and Mamba-1's selective scan: H = d_inner heads of P = 1,
                 N = d_state, G = 1, log_decay[h, n] = dt[h] * A[h, n].
The paper this project reproduces is about S_{-1}: models trained only from the zero state fail on the states that
long sequences reach, so the scan must start from any state and hand its final state on.

    import torch
    from scan_kernels import chunked_scan
    q, k = torch.randn(2, 1000, 1, 32), torch.randn(2, 1000, 1, 32)   # (B, L, G, N): one q/k group, 4 heads read it
    v, log_decay = torch.randn(2, 1000, 4, 64), -torch.rand(2, 1000, 4)   # (B, L, H, P), (B, L, H)
    y, state = chunked_scan(q, k, v, log_decay)              # y (B, L, H, P), state (B, H, P, N) = (2, 4, 64, 32)
    y2, state = chunked_scan(q, k, v, log_decay, state)      # the next 1000 tokens, starting where the first stopped
    y3, _ = chunked_scan(q, k, v, -torch.rand(2, 1000, 4, 32))   # a decay per key channel: (B, L, H, N)

Shape letters: B batch rows, L sequence length, H heads, P value width (Mamba-2's headdim), N key width (its
d_state), G q/k groups (head h reads group h // R, R = H // G: Mamba-2's ngroups), C chunk size, nc = ceil(L / C)
chunks, c sub-chunk size.

Sources: Mamba-2's "state space duality" (Dao & Gu 2024, "Transformers are SSMs", Section 6, and its ssd_minimal
listing); for the per-channel decay and its sub-chunks, Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training" (Section 4), implemented in flash-linear-attention's chunk_gla.

The chunked algorithm. The step-by-step loop is exact but sequential in L. Cut the sequence into chunks of C
positions; within a chunk let g_i = log_decay_0 + ... + log_decay_i (restarted per chunk; `cum` in the code) and S_prev
the state entering it. Unrolling the recurrence inside the chunk gives four pieces:

    1. intra-chunk output   y_i  = sum_{j<=i} exp(g_i - g_j) (q_i . k_j) v_j       a masked (C, C) "attention"
    2. per-chunk states     X    = sum_j exp(g_last - g_j) v_j k_j^T               what the chunk alone writes
    3. pass over chunks     S_end = exp(g_last) S_prev + X                         the initial state enters at the
                                                                                   first chunk, the final leaves last
    4. inter-chunk output   y_i += exp(g_i) S_prev q_i                             what earlier chunks contribute

Pieces 1, 2 and 4 are matrix products, independent across chunks; only piece 3 is sequential, over nc steps. Every
exponent is a difference g_i - g_j with i >= j (or g_i itself), so with log_decay <= 0 it is <= 0: nothing
overflows however negative the decay, and as g restarts every chunk its magnitude never grows with L. Entries with
j > i are masked to -inf before exponentiating, never computed and then zeroed.

A decay per key channel makes g_i a vector over n, and piece 1's product sum_n q_i[n] k_j[n] exp(g_i[n] - g_j[n]):
the decay sits inside the sum, no longer scaling a (C, C) matrix of products q_i . k_j from outside. Factoring
through a reference position r makes it a matrix product again:
    exp(g_i - g_j) = exp(g_i - g_r) exp(g_r - g_j),   then   sum_n (q_i exp(g_i - g_r))[n] (k_j exp(g_r - g_j))[n]
Both factors are <= 1 only when j <= r <= i; for any other pair one grows like exp(sum of the decays between i and
j), which for a decay of -1e3 per step overflows at once. GLA's answer is sub-chunks of c positions inside a chunk:
between two sub-chunks r is their boundary, and both factors are <= 1. Inside one there is no such position: the
PyTorch path takes its last position and keeps c small enough that exp(g_i - g_r) <= exp(MAX_EXPONENT)
(_sub_chunk_sizes); the Triton kernels, in sub-chunks of 16 rows (a matrix product's smallest tile), compute those
products exactly, elementwise over n. Pieces 2-4 only need exp(g_i), exp(g_last - g_j) and exp(g_last), elementwise
over n, all <= 1.

The file reads: the step-by-step definition (scan_reference, in float64, which every fast path is tested against;
then scan_step, the fast one-token step for generation); the same four pieces as four dense einsums (dense_scan);
the chunked algorithm in PyTorch and the public chunked_scan(..., backend="auto" | "torch" | "triton"); and last
the Triton kernels, forward and hand-written backward, with their launch code.
"""
import contextlib
import functools
import os

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# The definition
# ----------------------------------------------------------------------------------------------------------------

def scan_reference(q, k, v, log_decay, initial_state=None, *, chunk_size=64, backend="auto"):
    """The recurrence one step at a time, in float64, written straight from the equations: the definition every
    fast path is tested against.

    q, k (B, L, G, N); v (B, L, H, P); log_decay (B, L, H) or (B, L, H, N); initial_state (B, H, P, N) or None.
    Returns y (B, L, H, P) in v's dtype and final_state (B, H, P, N) in float32 (float64 for float64 inputs).
    chunk_size and backend are accepted so that the signature matches chunked_scan; they change nothing here.
    """
    B, L, G, N = _check_inputs(q, k, v, log_decay, initial_state)
    H, P = v.shape[2], v.shape[3]
    y_dtype, state_dtype = v.dtype, torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k = (x.double().repeat_interleave(H // G, dim=2) for x in (q, k))  # head h reads group h // R: (B, L, H, N)
    v = v.double()
    decay = torch.exp(log_decay.double()).view(B, L, H, 1, -1)  # (.., 1, 1) the whole state, (.., 1, N) its columns
    state = (torch.zeros(B, H, P, N, dtype=torch.float64, device=v.device) if initial_state is None
             else initial_state.double())
    outputs = []
    for t in range(L):
        state = decay[:, t] * state + v[:, t, :, :, None] * k[:, t, :, None, :]  # S_t: (B, H, P, N)
        outputs.append((state @ q[:, t, :, :, None]).squeeze(-1))  # y_t = S_t q_t: (B, H, P)
    return torch.stack(outputs, dim=1).to(y_dtype), state.to(state_dtype)


def _check_inputs(q, k, v, log_decay, initial_state):
    """Validate shapes with one clear message each; return (B, L, G, N)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, L, G, N); got q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, L, G, N = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, L):
        raise ValueError(f"v must be (B, L, H, P) with B, L = {B}, {L} as in q; got {tuple(v.shape)}")
    H, P = v.shape[2], v.shape[3]
    if H % G != 0:
        raise ValueError(f"the number of heads H={H} must be a multiple of the number of q/k groups G={G}")
    if log_decay.shape not in ((B, L, H), (B, L, H, N)):
        raise ValueError(f"log_decay must be (B, L, H) = {(B, L, H)}, or (B, L, H, N) = {(B, L, H, N)} for a decay "
                         f"per key channel; got {tuple(log_decay.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, P, N):
        raise ValueError(f"initial_state must be (B, H, P, N) = {(B, H, P, N)} or None; "
                         f"got {tuple(initial_state.shape)}")
    if L < 1:
        raise ValueError("the sequence length L must be at least 1")
    return B, L, G, N


def scan_step(q, k, v, log_decay, state=None):
    """The fast one-token step of the same recurrence: O(1) work per token, for generation (model.LM.step).

    q, k (B, G, N); v (B, H, P); log_decay (B, H), or (B, H, N) for a decay per key channel; state (B, H, P, N) or
    None (zeros). Returns y (B, H, P) in v's dtype and the new state (B, H, P, N) in float32 (float64 for float64
    inputs).
    """
    B, G, N = q.shape
    H, P = v.shape[1], v.shape[2]
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32  # the state's (float64 only for tests)
    if state is None:
        state = torch.zeros(B, H, P, N, dtype=dtype, device=v.device)
    decay = torch.exp(log_decay.to(dtype)).view(B, H, 1, -1)  # (B, H, 1, 1) or (B, H, 1, N): the state or its columns
    state = decay * state.to(dtype)  # a new tensor: the caller's state is left as it was
    # the R = H // G heads of a group share its k and q, so a group's heads are the rows of one (R * P, N) matrix:
    # += v k^T as one batched product per group, done in place (a second large temporary would cost far more on a
    # CPU than the arithmetic, in fresh pages from the allocator)
    grouped = state.view(B * G, H // G * P, N)
    grouped.baddbmm_(v.to(dtype).reshape(B * G, H // G * P, 1), k.to(dtype).reshape(B * G, 1, N))
    y = torch.bmm(grouped, q.to(dtype).reshape(B * G, N, 1)).view(B, H, P)
    return y.to(v.dtype), state


# ----------------------------------------------------------------------------------------------------------------
# The four pieces as dense einsums
# ----------------------------------------------------------------------------------------------------------------

def _segment_sums(x):
    """sum_{j < t <= i} x_t for i >= j, -inf above the diagonal.  (..., T) -> (..., T, T)"""
    cum = x.cumsum(-1)
    diff = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool, device=x.device).tril()
    return diff.masked_fill(~causal, float("-inf"))


def dense_scan(q, k, v, log_decay, initial_state=None, chunk_size=64):
    """The four pieces in the form of the Mamba-2 paper's minimal SSD listing, for a scalar decay: every chunk's
    (C, C) decay matrix and the (nc + 1, nc + 1) chunk-to-chunk decay matrix are materialised at once, and piece 3,
    the pass over chunks, is one matrix product instead of a loop. Compact to read; python -m bench times it.

    Shapes as chunked_scan, log_decay (B, L, H) only; q and k are expanded per head, L is zero-padded to whole
    chunks (as _to_chunks explains, harmless). Returns y (B, L, H, P) and the final state (B, H, P, N).
    """
    if log_decay.dim() != 3:
        raise ValueError("dense_scan takes a scalar decay, log_decay (B, L, H)")
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    R, C = H // G, chunk_size
    q = _to_chunks(q.repeat_interleave(R, dim=2), C)  # (B, nc, C, H, N)
    k = _to_chunks(k.repeat_interleave(R, dim=2), C)
    v = _to_chunks(v, C)  # (B, nc, C, H, P)
    log_decay = _to_chunks(log_decay, C).permute(0, 3, 1, 2)  # (B, H, nc, C)
    cum = log_decay.cumsum(-1)
    within = torch.exp(_segment_sums(log_decay))  # exp(g_i - g_j), i >= j: (B, H, nc, C, C)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", q, k, within, v)  # 1.
    decay_to_end = torch.exp(cum[..., -1:] - cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", k, decay_to_end, v)  # 2. X of each chunk
    start = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state[:, None].to(states.dtype)
    states = torch.cat([start, states], dim=1)  # (B, nc + 1, H, P, N)
    between = torch.exp(_segment_sums(F.pad(cum[..., -1], (1, 0))))  # (B, H, nc + 1, nc + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", between, states)  # 3. the state entering each chunk, then the final
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", q, states[:, :-1], torch.exp(cum))  # 4.
    return (y_diag + y_off).reshape(B, -1, H, P)[:, :L], states[:, -1]


# ----------------------------------------------------------------------------------------------------------------
# The chunked algorithm in PyTorch
# ----------------------------------------------------------------------------------------------------------------

# Inside a sub-chunk the per-channel path factors exp(g_i - g_j) through the sub-chunk's last position, with a factor
# up to exp(MAX_EXPONENT). 16 keeps it (9e6) far from float32's limit (3e38) and costs little precision: an
# exponent near 16 carries an absolute rounding error of about 1e-6, which is the factor's relative error.
MAX_EXPONENT = 16.0

# A per-channel decay costs the chunked form about ten elementwise passes over (B, L, H, N) besides its matrix
# products, while the recurrence costs about four passes over the state, (B, L, H, P, N). At Mamba-1's size (1536
# heads of P = 1, N = 16, L = 2048) the recurrence is three times faster on a CPU; with H * P = 1536 kept, the two
# cross between P = 4 and P = 8.
RECURRENT_MAX_P = 4


def _scan_torch(q, k, v, log_decay, initial_state, chunk_size):
    """The chunked algorithm in PyTorch, differentiated by autograd, walking the chunks in order: fast on CPUs, as
    every intermediate stays small enough for the cache; activation memory O(B * H * L * C), nothing L x L.
    Shapes as chunked_scan.

    Three versions of it, by the kind of decay and the height P of the state: scalar decays, per-channel decays, and
    per-channel decays on states of at most RECURRENT_MAX_P rows (Mamba-1's P = 1), which take the recurrence a step
    at a time. A chunk longer than the sequence would only add padding, and (C, C) memory, so it is at most L long.
    """
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32  # the state's (float64 only for tests)
    chunk_size = min(chunk_size, q.shape[1])
    initial_state = None if initial_state is None else initial_state.to(dtype)
    if log_decay.dim() == 3:
        scan = _scan_torch_scalar
    else:  # a decay per key channel
        scan = _scan_torch_recurrent if v.shape[3] <= RECURRENT_MAX_P else _scan_torch_per_channel
    no_autocast = contextlib.nullcontext() if q.device.type == "meta" else torch.autocast(q.device.type, enabled=False)
    with no_autocast:  # float32 products even inside an autocast region (the meta device, for estimates, has none)
        y, final_state = scan(q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype), initial_state, chunk_size)
    return y.to(v.dtype), final_state


def _to_chunks(x, chunk_size):
    """(B, L, ...) -> (B, nc, C, ...), zero-padding L up to a multiple of C.

    Zero padding is harmless: a padded position has k = v = 0 (writes nothing) and log_decay = 0 (decays nothing),
    so the state after the padding equals the state after the last real token.
    """
    pad = (-x.shape[1]) % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.unflatten(1, (x.shape[1] // chunk_size, chunk_size))


def _chunk_views(x, chunk_size, groups):
    """(B, L, G * R, D) -> one view (B, G, R, C, D) per chunk, heads split into their q/k groups.

    q and k (G heads of their own) come out as (B, G, 1, C, N), so that they broadcast over the R heads of their
    group without being copied. Views of the input, not contiguous: the loops below copy one chunk at a time (a
    small, cache-sized copy) rather than the whole input at once, which on a CPU costs more (fresh memory) than the
    matrix products' own copies. Unbound once, because indexing chunk c inside a loop would make autograd zero-fill
    a full-size gradient for every chunk.
    """
    x = _to_chunks(x, chunk_size).unflatten(3, (groups, x.shape[2] // groups))  # (B, nc, C, G, R, D)
    return x.permute(1, 0, 3, 4, 2, 5).unbind(0)


def _masked_decay(cum_decay, causal):
    """exp(g_i - g_j) for i >= j and 0 above the diagonal.  (..., C) -> (..., C, C); causal (C, C) bool, i >= j.

    The mask is applied to the exponent (-inf) rather than to the result, so exp never sees a positive number and
    no inf * 0 = nan can arise in the backward pass.
    """
    diff = cum_decay[..., :, None] - cum_decay[..., None, :]
    return torch.exp(diff.masked_fill_(~causal, float("-inf")))  # in place: diff is a fresh temporary


def _scan_torch_scalar(q, k, v, log_decay, initial_state, chunk_size):
    """The four pieces for a scalar decay, chunk after chunk.  q, k (B, L, G, N); v (B, L, H, P); log_decay
    (B, L, H); initial_state (B, H, P, N) or None; all in the state's dtype.  Returns y (B, L, H, P), final state.

    Pieces 1, 2 and 4 are batched matrix products inside each chunk, and piece 3 is the hand-over from one
    iteration to the next. Walking the chunks (rather than materialising every chunk at once, as the Triton path
    does in parallel) keeps each intermediate small enough to stay in a CPU's cache.
    """
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    R, C = H // G, chunk_size
    cum = _to_chunks(log_decay, C).cumsum(2)  # g_i, restarted at every chunk: (B, nc, C, H)
    cum = cum.unflatten(3, (G, R)).permute(1, 0, 3, 4, 2).contiguous()  # (nc, B, G, R, C)
    decay_from_start = torch.exp(cum)[..., None]  # exp(g_i): (nc, B, G, R, C, 1)
    decay_to_end = torch.exp(cum[..., -1:] - cum)[..., None]  # exp(g_last - g_j): (nc, B, G, R, C, 1)
    chunk_decay = decay_from_start[..., -1:, :]  # exp(g_last): (nc, B, G, R, 1, 1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # True where i >= j

    state = (torch.zeros(B, G, R, P, N, dtype=v.dtype, device=v.device) if initial_state is None
             else initial_state.reshape(B, G, R, P, N))  # the initial state enters here
    outputs = []
    for q_c, k_c, v_c, cum_c, from_start, to_end, decay in zip(
            _chunk_views(q, C, G), _chunk_views(k, C, G), _chunk_views(v, C, G), cum, decay_from_start, decay_to_end,
            chunk_decay):
        q_c, k_c, v_c = q_c.contiguous(), k_c.contiguous(), v_c.contiguous()  # (B, G, 1, C, N) x 2, (B, G, R, C, P)
        # 1. intra-chunk output: a causal, decay-weighted (C, C) attention inside the chunk
        scores = q_c @ k_c.transpose(-1, -2)  # (B, G, 1, C, C), shared by the R heads of a group
        y = (scores * _masked_decay(cum_c, causal)) @ v_c  # (B, G, R, C, P)
        # 4. inter-chunk output: read the state entering the chunk, decayed to each position
        y += (q_c * from_start) @ state.transpose(-1, -2)  # in place: y is a fresh product, which autograd keeps not
        outputs.append(y.permute(0, 3, 1, 2, 4))  # (B, C, G, R, P): stacked below straight into y's layout
        # 2. what the chunk writes, decayed to its end; 3. the hand-over to the next chunk
        written = (v_c * to_end).transpose(-1, -2) @ k_c  # (B, G, R, P, N)
        state = torch.addcmul(written, decay, state)  # exp(g_last) S_prev + X; the final state leaves after the loop
    y = torch.stack(outputs, dim=1).reshape(B, -1, H, P)[:, :L]  # (B, nc, C, G, R, P) -> (B, L, H, P)
    return y, state.reshape(B, H, P, N)


def _scan_torch_per_channel(q, k, v, log_decay, initial_state, chunk_size):
    """The four pieces for a decay per key channel, chunk after chunk, in sub-chunks.  q, k (B, L, G, N);
    v (B, L, H, P); log_decay (B, L, H, N); initial_state (B, H, P, N) or None; all in the state's dtype.
    Returns y (B, L, H, P) and the final state (B, H, P, N).

    Each chunk is cut into ns = C / c sub-chunks of c positions (_sub_chunk_sizes), with g restarted at every
    sub-chunk. Inside a sub-chunk, piece 1 factors through its last position r: q_i exp(g_i - g_r), whose exponent
    is >= 0 but at most MAX_EXPONENT, times k_j exp(g_r - g_j) <= 1. Between sub-chunks, pieces 2-4 run as for whole
    chunks, with the per-channel decays multiplying columns of the state.
    """
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    R, C = H // G, chunk_size
    state = (torch.zeros(B, G, R, P, N, dtype=v.dtype, device=v.device) if initial_state is None
             else initial_state.reshape(B, G, R, P, N))
    outputs = []
    for q_c, k_c, v_c, decay_c, c in zip(_chunk_views(q, C, G), _chunk_views(k, C, G), _chunk_views(v, C, G),
                                         _chunk_views(log_decay, C, G), _sub_chunk_sizes(log_decay, C)):
        ns = C // c
        q_s, k_s = (x.contiguous().unflatten(3, (ns, c)) for x in (q_c, k_c))  # (B, G, 1, ns, c, N)
        v_s = v_c.contiguous().unflatten(3, (ns, c))  # (B, G, R, ns, c, P)
        cum = decay_c.contiguous().unflatten(3, (ns, c)).cumsum(4)  # g restarted every sub-chunk: (B,G,R,ns,c,N)
        last = cum[..., -1:, :]  # g_r: (B, G, R, ns, 1, N)
        to_end = torch.exp(last - cum)  # exp(g_r - g_j) in [exp(-MAX_EXPONENT), 1], by the choice of c
        sub_decay = torch.exp(last)  # exp(g_r), each column's decay across its sub-chunk: (B, G, R, ns, 1, N)
        k_to_end = k_s * to_end  # what k_j writes, decayed to the sub-chunk's end
        q_from_end = q_s / to_end  # q_i exp(g_i - g_r): the division is safe since to_end >= exp(-MAX_EXPONENT)
        q_from_start = q_from_end * sub_decay  # q_i exp(g_i): reads the state entering the sub-chunk
        # 1. inside each sub-chunk; the entries above the diagonal are finite (bounded as above) and masked
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # True where i >= j
        scores = (q_from_end @ k_to_end.transpose(-1, -2)).masked_fill_(~causal, 0.0)
        y_within = scores @ v_s  # (B, G, R, ns, c, P)
        written = v_s.transpose(-1, -2) @ k_to_end  # 2. (B, G, R, ns, P, N)
        pieces = []
        # unbound rather than indexed, so that autograd does not zero-fill a full-size gradient per sub-chunk
        for y_sub, q_sub, decay_sub, written_sub in zip(*(x.unbind(3) for x in (y_within, q_from_start, sub_decay,
                                                                                 written))):
            pieces.append(y_sub + q_sub @ state.transpose(-1, -2))  # 4. read the state entering the sub-chunk
            state = torch.addcmul(written_sub, decay_sub, state)  # 3. hand it over to the next
        y = torch.cat(pieces, dim=3) if ns > 1 else pieces[0]  # (B, G, R, C, P)
        outputs.append(y.permute(0, 3, 1, 2, 4))  # (B, C, G, R, P)
    y = torch.stack(outputs, dim=1).reshape(B, -1, H, P)[:, :L]
    return y, state.reshape(B, H, P, N)


def _scan_torch_recurrent(q, k, v, log_decay, initial_state, chunk_size):
    """The recurrence itself, a step at a time, for a decay per key channel on states of few rows (P = 1: Mamba-1).
    Shapes and dtypes as _scan_torch_per_channel.

    A state of P = 1 row is no larger than one position's q: the chunked form's (C, C) products would cost more than
    they save. Per block of C positions, the decays and the writes v_t k_t^T are computed at once; then each step is
    one fused multiply-add of the state, S_t = exp(log_decay_t) S_{t-1} + v_t k_t^T, and one read, y_t = S_t q_t.
    Every factor is exp of a log_decay <= 0, however negative.
    """
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    R = H // G
    state = (torch.zeros(B, G, R, P, N, dtype=v.dtype, device=v.device) if initial_state is None
             else initial_state.reshape(B, G, R, P, N))
    outputs = []
    # split rather than sliced, so that autograd does not zero-fill a full-size gradient per block
    for q_b, k_b, v_b, decay_b in zip(*(x.split(chunk_size, dim=1) for x in (q, k, v, log_decay))):
        T = q_b.shape[1]
        decay = torch.exp(decay_b).view(B, T, G, R, 1, N)  # each column's decay at each step
        written = v_b.view(B, T, G, R, P, 1) * k_b.view(B, T, G, 1, 1, N)  # v_t k_t^T: (B, T, G, R, P, N)
        block = []
        for decay_t, written_t, q_t in zip(decay.unbind(1), written.unbind(1), q_b.view(B, T, G, N, 1).unbind(1)):
            state = torch.addcmul(written_t, decay_t, state)  # (B, G, R, P, N)
            block.append(state.view(B, G, R * P, N) @ q_t)  # (B, G, R * P, 1): one product per group, not per head
        # one tensor per block: thousands of small outputs kept alive would fragment the memory the blocks reuse
        outputs.append(torch.stack(block, dim=1).view(B, T, H, P))
    return torch.cat(outputs, dim=1), state.reshape(B, H, P, N)


def _sub_chunk_sizes(log_decay, chunk_size):
    """For each chunk, the largest divisor c of C with (c - 1) * (its strongest decay) <= MAX_EXPONENT: a list of nc
    ints.  log_decay (B, L, H, N).

    (c - 1) steps separate a sub-chunk's first position from its last, so exp(g_i - g_r) <= exp(MAX_EXPONENT).
    Mild decays get c = C, one matrix product per chunk as for a scalar decay; a decay of -1e3 gets c = 1, the
    recurrence itself.
    """
    strongest = -_to_chunks(log_decay.detach(), chunk_size).amin(dim=(0, 2, 3, 4))  # (nc,)
    if strongest.device.type == "meta":  # no numbers (a memory estimate, model.training_memory): whole chunks
        return [chunk_size] * len(strongest)
    divisors = [c for c in range(chunk_size, 1, -1) if chunk_size % c == 0]
    return [next((c for c in divisors if (c - 1) * s <= MAX_EXPONENT), 1) for s in strongest.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------------------------

BACKENDS = ("auto", "torch", "triton")


def chunked_scan(q, k, v, log_decay, initial_state=None, *, chunk_size=64, backend="auto"):
    """Run the recurrence S_t = exp(log_decay_t) S_{t-1} + v_t k_t^T, y_t = S_t q_t from initial_state.

    q, k          (B, L, G, N)
    v             (B, L, H, P)   H a multiple of G; head h reads q/k group h // (H // G)
    log_decay     (B, L, H)      values <= 0, one per head and step; or
                  (B, L, H, N)   one per head, step and key channel (column n of the state decays by its own)
    initial_state (B, H, P, N) or None (the zero state)
    returns y (B, L, H, P) in v's dtype, final_state (B, H, P, N) in float32

    backend: "torch" (plain PyTorch, any device), "triton" (CUDA, or CPU under TRITON_INTERPRET=1; P, N <= 128,
    chunk_size a power of two in [16, 128], tiles that fit the GPU's shared memory), "auto" (triton for CUDA tensors
    when triton imports and takes these sizes, else torch). log_decay must be <= 0: the numerical safety of both
    paths rests on it. A gradient arriving on final_state flows back into every input, so callers may backpropagate
    through a carried state. A chunk_size beyond the sequence is shortened to it (torch: L; triton: the smallest
    power of two >= 16 that covers L), which changes nothing but the memory.
    """
    _check_inputs(q, k, v, log_decay, initial_state)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    if backend == "triton":
        _check_triton(q, k, v, chunk_size)
    elif backend == "auto":
        use_triton = HAS_TRITON and q.is_cuda and _triton_refusal(q, k, v, chunk_size) is None
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        return _scan_triton(q, k, v, log_decay, initial_state, chunk_size)
    return _scan_torch(q, k, v, log_decay, initial_state, chunk_size)


# ----------------------------------------------------------------------------------------------------------------
# The chunked algorithm in Triton
#
# Kernels for the forward and a hand-written backward, wired through torch.autograd.Function: pieces 1, 2 and 4
# run for all chunks at once, one program per (chunk, row, head), and only piece 3 walks the chunks.
#
# Layouts: q, k (B, L, G, N), v and dy (B, L, H, P) contiguous; cum float32 holds g restarted per chunk (zero-padded,
# so the padding repeats g_last), (B, H, nc*C) for a scalar decay and (B, H, nc*C, N) for a per-channel one; states
# (B, nc, H, P, N) float32. Every program first moves each base pointer to its own batch row, chunk and head, so the
# tile loads below it only add offsets inside one chunk. Those shifts are int64: the axis-0 program id, which
# carries the large count (chunks x rows x heads; its limit is 2^31 - 1, while axes 1 and 2 stop at 65535), is
# widened to int64 before any offset arithmetic, so tensors beyond 2^31 elements are addressed correctly; axis 1
# only counts a few column tiles and stays int32. P and N are each one tile of at most 128 columns.
#
# Scalar decay
# Forward:   _chunk_state_kernel (piece 2) -> _state_pass_kernel (piece 3) -> _chunk_output_kernel (pieces 1 + 4)
# Backward:  the same three pieces run backwards. The gradient of the state at the end of chunk c obeys
#                dS_end[c-1] = exp(g_last[c]) dS_end[c] + sum_i exp(g_i) dy_i q_i^T
#            which is piece 3 again, in reverse, fed by a piece-2-like sum (_chunk_state_kernel with dy and q).
#            Then _grad_qk_kernel and _grad_v_kernel differentiate pieces 1, 2 and 4 chunk by chunk.
#            The log_decay gradient uses an identity: inside a chunk g enters only through exp(g_i) q_i,
#            exp(-g_j) k_j and exp(g_last) S_end, so dL/dg_t = q_t.dq_t - k_t.dk_t (+ <dS_end, S_end> at the
#            chunk's last position), with dq, dk the gradients of head h alone; log_decay_s then collects
#            dg_t for t >= s in its chunk (a reverse cumulative sum).
#
# Per-channel decay
# The same pieces, with g a vector over n. Pieces 2 and 3 and the backward pass over chunks are the kernels above
# with PER_CHANNEL set: the decay multiplies the state's columns. Pieces 1 + 4 and their gradients are
# _channel_output_kernel, _channel_grad_v_kernel and _channel_grad_qk_kernel. They walk a chunk one sub-chunk of
# SUB_CHUNK rows at a time: between two sub-chunks the decay factors through the last position b before the later
# one, exp(g_i - g_j) = exp(g_i - g_b) exp(g_b - g_j) with both factors <= 1, so the products are tile matmuls;
# inside a sub-chunk, _within_sub_chunk computes them exactly, elementwise over n, one key position at a time. The
# log_decay identity holds column by column: dL/dg_t[n] = q_t[n] dq_t[n] - k_t[n] dk_t[n], plus
# sum_p dS_end[p, n] S_end[p, n] at the chunk's last position.
# ----------------------------------------------------------------------------------------------------------------

try:  # triton is optional: without it (macOS, no wheel) the torch path still works
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the kernels below are then defined against this stand-in and never launched
    HAS_TRITON = False

    class _TritonStandIn:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _TritonStandIn()


SUB_CHUNK = 16  # rows per sub-chunk in the per-channel kernels: the smallest tile tl.dot takes


@triton.jit
def _chunk_and_head(num_chunks, H, G):
    """Which (chunk, b, h, g) this program works on, for grids whose axis 0 runs over nc * B * H.  The program id is
    widened to int64 first, so the pointer shifts derived from it cannot overflow."""
    pid = tl.program_id(0).to(tl.int64)
    chunk, bh = pid % num_chunks, pid // num_chunks
    b, h = bh // H, bh % H
    return chunk, b, h, h // (H // G)


@triton.jit
def _load_chunk_qk(q_ptr, k_ptr, cum_ptr, b, h, g, start, n, L, H, G, N, num_chunks, CHUNK: tl.constexpr):
    """What the output and v-gradient programs read first: q and k (C, BLOCK_N) of group g at columns n, zero past
    the sequence's end and past N, then g (C,) and g_last of head h.  start: the chunk's first position."""
    q_ptr += ((b * L + start) * G + g) * N
    k_ptr += ((b * L + start) * G + g) * N
    cum_ptr += (b * H + h) * num_chunks * CHUNK + start
    i = tl.arange(0, CHUNK)
    qk_mask = (start + i < L)[:, None] & (n[None, :] < N)
    q = tl.load(q_ptr + i[:, None] * G * N + n[None, :], mask=qk_mask, other=0.0)  # (C, BLOCK_N)
    k = tl.load(k_ptr + i[:, None] * G * N + n[None, :], mask=qk_mask, other=0.0)  # (C, BLOCK_N)
    return q, k, tl.load(cum_ptr + i), tl.load(cum_ptr + CHUNK - 1)  # (C, BLOCK_N) x 2, (C,), ()


@triton.jit
def _causal_decay(cum):
    """exp(g_i - g_j) where i >= j, else 0; the exponent is masked before exp.  (C,) -> (C, C)"""
    i = tl.arange(0, cum.shape[0])
    return tl.exp(tl.where(i[:, None] >= i[None, :], cum[:, None] - cum[None, :], float("-inf")))


@triton.jit
def _cum_tile(cum_ptr, rows, n, N):
    """g of a per-channel decay at rows (R,) of a chunk and columns n (BLOCK_N,): (R, BLOCK_N), zero past N.
    cum_ptr: the chunk's first row."""
    return tl.load(cum_ptr + rows[:, None] * N + n[None, :], mask=n[None, :] < N, other=0.0)


@triton.jit
def _cum_row(cum_ptr, row, n, N):
    """g of a per-channel decay at one row of a chunk and columns n: (BLOCK_N,), zero past N."""
    return tl.load(cum_ptr + row * N + n, mask=n < N, other=0.0)


@triton.jit
def _chunk_decay(cum_ptr, offs, N, CHUNK: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """exp(g_last) of one chunk for the state entries offs (flattened p * N + n): that of each entry's column n with
    PER_CHANNEL (cum_ptr: the chunk's first row; offs % N is a valid column even past the state's end), else one
    number (cum_ptr: the chunk's first position)."""
    if PER_CHANNEL:
        cum_last = tl.load(cum_ptr + (CHUNK - 1) * N + offs % N)  # (BLOCK,)
    else:
        cum_last = tl.load(cum_ptr + CHUNK - 1)  # ()
    return tl.exp(cum_last)


@triton.jit
def _chunk_state_kernel(rows_ptr, cols_ptr, cum_ptr, out_ptr, L, H, G, P, N, num_chunks,
                        CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        WEIGHT_TO_END: tl.constexpr, PER_CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[b, c, h] = sum_i rows_i (w_i cols_i)^T over chunk c: a (P, N) tile per program.

    Forward (piece 2): rows = v, cols = k, w_i = exp(g_last - g_i).  Backward: rows = dy, cols = q, w_i = exp(g_i).
    With PER_CHANNEL, w_i is a vector over the columns n (cum is (B, H, nc*C, N)); otherwise a number per row.
    Grid: (nc * B * H, P-blocks * N-blocks).
    """
    chunk, b, h, g = _chunk_and_head(num_chunks, H, G)
    start = chunk * CHUNK
    rows_ptr += ((b * L + start) * H + h) * P
    cols_ptr += ((b * L + start) * G + g) * N
    cum_ptr += ((b * H + h) * num_chunks * CHUNK + start) * (N if PER_CHANNEL else 1)
    out_ptr += ((b * num_chunks + chunk) * H + h) * P * N
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    i = tl.arange(0, CHUNK)
    p = (tl.program_id(1) // num_n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tl.program_id(1) % num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_seq = start + i < L
    rows_mask = in_seq[:, None] & (p[None, :] < P)
    cols_mask = in_seq[:, None] & (n[None, :] < N)
    out_mask = (p[:, None] < P) & (n[None, :] < N)

    rows = tl.load(rows_ptr + i[:, None] * H * P + p[None, :], mask=rows_mask, other=0.0)  # (C, BLOCK_P)
    cols = tl.load(cols_ptr + i[:, None] * G * N + n[None, :], mask=cols_mask, other=0.0)  # (C, BLOCK_N)
    if PER_CHANNEL:
        cum = _cum_tile(cum_ptr, i, n, N)  # (C, BLOCK_N)
        weight = tl.exp(_cum_row(cum_ptr, CHUNK - 1, n, N)[None, :] - cum) if WEIGHT_TO_END else tl.exp(cum)
        rows, cols = rows.to(cols.dtype), (cols * weight).to(cols.dtype)
    else:
        cum = tl.load(cum_ptr + i)  # (C,)
        weight = tl.exp(tl.load(cum_ptr + CHUNK - 1) - cum) if WEIGHT_TO_END else tl.exp(cum)  # (C,)
        rows = (rows * weight[:, None]).to(cols.dtype)
    tile = tl.dot(tl.trans(rows), cols, input_precision=DOT_PRECISION)
    tl.store(out_ptr + p[:, None] * N + n[None, :], tile, mask=out_mask)  # (BLOCK_P, BLOCK_N)


@triton.jit
def _state_pass_kernel(states_ptr, cum_ptr, initial_ptr, final_ptr, H, N, state_size, num_chunks,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_INITIAL: tl.constexpr,
                       PER_CHANNEL: tl.constexpr):
    """Piece 3, forward: S_end = exp(g_last) S_prev + X, chunk after chunk (exp(g_last) per column with PER_CHANNEL).

    On entry states[b, c, h] holds X (the chunk's own contribution); on exit it holds S_prev, the state entering
    chunk c, which is what the output kernel reads. Each program owns BLOCK entries of one (b, h) state.
    Grid: (B * H, ceil(P * N / BLOCK)).
    """
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cum_row = N if PER_CHANNEL else 1  # cum's entries per position
    states_ptr += (b * num_chunks * H + h) * state_size  # chunk 0; each next chunk is H * state_size further
    cum_ptr += bh * num_chunks * CHUNK * cum_row  # chunk 0; each next chunk is CHUNK * cum_row further
    final_ptr += bh * state_size
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < state_size
    if HAS_INITIAL:  # initial_ptr is None otherwise
        state = tl.load(initial_ptr + bh * state_size + offs, mask=valid, other=0.0).to(tl.float32)  # (BLOCK,)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(num_chunks):
        written = tl.load(states_ptr + offs, mask=valid, other=0.0)  # (BLOCK,)
        tl.store(states_ptr + offs, state, mask=valid)  # (BLOCK,)
        state = _chunk_decay(cum_ptr, offs, N, CHUNK, PER_CHANNEL) * state + written
        states_ptr += H * state_size
        cum_ptr += CHUNK * cum_row
    tl.store(final_ptr + offs, state, mask=valid)  # (BLOCK,)


@triton.jit
def _state_pass_backward_kernel(dstates_ptr, states_ptr, final_ptr, dfinal_ptr, cum_ptr, dinitial_ptr,
                                end_dot_ptr, H, N, state_size, num_chunks,
                                CHUNK: tl.constexpr, BLOCK: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """Piece 3, backward: dS_end[c-1] = exp(g_last[c]) dS_end[c] + D[c], from the last chunk to the first.

    On entry dstates[b, c, h] holds D[c] = sum_i dy_i (exp(g_i) q_i)^T; on exit it holds dS_end[c], the gradient of
    the state leaving chunk c. Also writes the initial state's gradient and, for a scalar decay, this block's share
    of <dS_end[c], S_end[c]> (for the log_decay gradient) to end_dot[bh, block, c]; a per-channel decay needs it per
    column, which the caller computes from the states (end_dot_ptr is None then). Grid: (B * H, ceil(P * N / BLOCK)).
    """
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cum_row = N if PER_CHANNEL else 1
    last = ((b * num_chunks + num_chunks - 1) * H + h) * state_size  # the last chunk; each earlier one H * state_size
    dstates_ptr += last
    states_ptr += last
    cum_ptr += (bh * num_chunks + num_chunks - 1) * CHUNK * cum_row  # the last chunk; each earlier one CHUNK * cum_row
    final_ptr += bh * state_size
    dfinal_ptr += bh * state_size
    dinitial_ptr += bh * state_size
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < state_size
    dstate = tl.load(dfinal_ptr + offs, mask=valid, other=0.0)  # (BLOCK,)
    state_end = tl.load(final_ptr + offs, mask=valid, other=0.0)  # (BLOCK,)
    for step in range(num_chunks):
        from_outputs = tl.load(dstates_ptr + offs, mask=valid, other=0.0)  # (BLOCK,)
        tl.store(dstates_ptr + offs, dstate, mask=valid)  # (BLOCK,)
        if not PER_CHANNEL:
            end_dot = end_dot_ptr + (bh * tl.num_programs(1) + tl.program_id(1)) * num_chunks
            tl.store(end_dot + num_chunks - 1 - step, tl.sum(dstate * state_end))  # ()
        # the state leaving chunk c - 1 is the state entering chunk c
        state_end = tl.load(states_ptr + offs, mask=valid, other=0.0)  # (BLOCK,)
        dstate = _chunk_decay(cum_ptr, offs, N, CHUNK, PER_CHANNEL) * dstate + from_outputs
        dstates_ptr -= H * state_size
        states_ptr -= H * state_size
        cum_ptr -= CHUNK * cum_row
    tl.store(dinitial_ptr + offs, dstate, mask=valid)  # (BLOCK,)


@triton.jit
def _chunk_output_kernel(q_ptr, k_ptr, v_ptr, cum_ptr, states_ptr, y_ptr, L, H, G, P, N, num_chunks,
                         CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Pieces 1 + 4: y_i = sum_{j<=i} exp(g_i - g_j)(q_i.k_j) v_j + exp(g_i) S_prev q_i for one chunk, one head and
    BLOCK_P value columns.  Grid: (nc * B * H, P-blocks)."""
    chunk, b, h, g = _chunk_and_head(num_chunks, H, G)
    start = chunk * CHUNK
    v_ptr += ((b * L + start) * H + h) * P
    y_ptr += ((b * L + start) * H + h) * P
    states_ptr += ((b * num_chunks + chunk) * H + h) * P * N
    i = tl.arange(0, CHUNK)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    v_mask = (start + i < L)[:, None] & (p[None, :] < P)
    state_mask = (p[:, None] < P) & (n[None, :] < N)

    q, k, cum, _ = _load_chunk_qk(q_ptr, k_ptr, cum_ptr, b, h, g, start, n, L, H, G, N, num_chunks, CHUNK)
    v = tl.load(v_ptr + i[:, None] * H * P + p[None, :], mask=v_mask, other=0.0)  # (C, BLOCK_P)
    entering = tl.load(states_ptr + p[:, None] * N + n[None, :], mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N)

    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * _causal_decay(cum)  # (C, C)
    y = tl.dot(scores.to(v.dtype), v, input_precision=DOT_PRECISION)
    from_state = tl.dot(q, tl.trans(entering.to(q.dtype)), input_precision=DOT_PRECISION)  # (C, BLOCK_P)
    y += tl.exp(cum)[:, None] * from_state
    tl.store(y_ptr + i[:, None] * H * P + p[None, :], y.to(y_ptr.dtype.element_ty), mask=v_mask)  # (C, BLOCK_P)


@triton.jit
def _grad_qk_kernel(q_ptr, k_ptr, v_ptr, dy_ptr, cum_ptr, states_ptr, dstates_ptr, dq_ptr, dk_ptr, dcum_ptr,
                    L, H, G, P, N, num_chunks, batch,
                    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Gradients of q and k for one chunk, one group and BLOCK_N key columns, summed over the group's R heads
    inside the program (no atomics, deterministic). Per head h, with ds_ij = exp(g_i - g_j)(dy_i . v_j), j <= i:

        dq_i += sum_j ds_ij k_j + exp(g_i) S_prev^T dy_i              (pieces 1 and 4)
        dk_j += sum_i ds_ij q_i + exp(g_last - g_j) dS_end^T v_j      (pieces 1 and 2)

    and head h's share of dL/dg_t = q_t.dq_t - k_t.dk_t over these columns goes to dcum[n_block, b, h, t].
    Grid: (nc * B * G, N-blocks).
    """
    pid = tl.program_id(0).to(tl.int64)
    chunk, bg = pid % num_chunks, pid // num_chunks
    b, g = bg // G, bg % G
    start = chunk * CHUNK
    # the group's q, k, dq, dk; v, dy, cum, states and dcum at head 0, each head's offset added in the loop below
    q_ptr += ((b * L + start) * G + g) * N
    k_ptr += ((b * L + start) * G + g) * N
    dq_ptr += ((b * L + start) * G + g) * N
    dk_ptr += ((b * L + start) * G + g) * N
    v_ptr += (b * L + start) * H * P
    dy_ptr += (b * L + start) * H * P
    cum_ptr += b * H * num_chunks * CHUNK + start
    states_ptr += (b * num_chunks + chunk) * H * P * N
    dstates_ptr += (b * num_chunks + chunk) * H * P * N
    dcum_ptr += (tl.program_id(1) * batch + b) * H * num_chunks * CHUNK + start
    i = tl.arange(0, CHUNK)
    p = tl.arange(0, BLOCK_P)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_seq = start + i < L
    qk_offs, qk_mask = i[:, None] * G * N + n[None, :], in_seq[:, None] & (n[None, :] < N)
    v_offs, v_mask = i[:, None] * H * P + p[None, :], in_seq[:, None] & (p[None, :] < P)
    state_offs, state_mask = p[:, None] * N + n[None, :], (p[:, None] < P) & (n[None, :] < N)

    q = tl.load(q_ptr + qk_offs, mask=qk_mask, other=0.0)  # (C, BLOCK_N)
    k = tl.load(k_ptr + qk_offs, mask=qk_mask, other=0.0)  # (C, BLOCK_N)
    dq = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    dk = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    heads_per_group = H // G
    for r in range(heads_per_group):
        h = g * heads_per_group + r  # int64, as g is
        cum = tl.load(cum_ptr + h * num_chunks * CHUNK + i)  # (C,)
        cum_last = tl.load(cum_ptr + h * num_chunks * CHUNK + CHUNK - 1)
        v = tl.load(v_ptr + h * P + v_offs, mask=v_mask, other=0.0)  # (C, BLOCK_P)
        dy = tl.load(dy_ptr + h * P + v_offs, mask=v_mask, other=0.0).to(v.dtype)  # (C, BLOCK_P)
        entering = tl.load(states_ptr + h * P * N + state_offs, mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N)
        dstate_end = tl.load(dstates_ptr + h * P * N + state_offs, mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N)

        ds = tl.dot(dy, tl.trans(v), input_precision=DOT_PRECISION) * _causal_decay(cum)  # (C, C)
        dq_head = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq_head += tl.exp(cum)[:, None] * tl.dot(dy, entering.to(dy.dtype), input_precision=DOT_PRECISION)
        dk_head = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
        dk_head += tl.exp(cum_last - cum)[:, None] * tl.dot(v, dstate_end.to(v.dtype),
                                                             input_precision=DOT_PRECISION)
        dcum = tl.sum(q.to(tl.float32) * dq_head, axis=1) - tl.sum(k.to(tl.float32) * dk_head, axis=1)
        tl.store(dcum_ptr + h * num_chunks * CHUNK + i, dcum)  # (C,)
        dq += dq_head
        dk += dk_head
    tl.store(dq_ptr + qk_offs, dq.to(dq_ptr.dtype.element_ty), mask=qk_mask)  # (C, BLOCK_N)
    tl.store(dk_ptr + qk_offs, dk.to(dk_ptr.dtype.element_ty), mask=qk_mask)  # (C, BLOCK_N)


@triton.jit
def _grad_v_kernel(q_ptr, k_ptr, dy_ptr, cum_ptr, dstates_ptr, dv_ptr, L, H, G, P, N, num_chunks,
                   CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Gradient of v for one chunk, one head and BLOCK_P value columns (pieces 1 and 2):

        dv_j = sum_{i>=j} exp(g_i - g_j)(q_i . k_j) dy_i + exp(g_last - g_j) dS_end k_j

    Grid: (nc * B * H, P-blocks).
    """
    chunk, b, h, g = _chunk_and_head(num_chunks, H, G)
    start = chunk * CHUNK
    dy_ptr += ((b * L + start) * H + h) * P
    dv_ptr += ((b * L + start) * H + h) * P
    dstates_ptr += ((b * num_chunks + chunk) * H + h) * P * N
    i = tl.arange(0, CHUNK)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    dy_mask = (start + i < L)[:, None] & (p[None, :] < P)
    state_mask = (p[:, None] < P) & (n[None, :] < N)

    q, k, cum, cum_last = _load_chunk_qk(q_ptr, k_ptr, cum_ptr, b, h, g, start, n, L, H, G, N, num_chunks, CHUNK)
    dy = tl.load(dy_ptr + i[:, None] * H * P + p[None, :], mask=dy_mask, other=0.0).to(k.dtype)  # (C, BLOCK_P)
    dstate_end = tl.load(dstates_ptr + p[:, None] * N + n[None, :], mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N)

    # transposed scores: row j, column i, kept where i >= j
    scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * tl.trans(_causal_decay(cum))  # (C, C)
    dv = tl.dot(scores_t.to(dy.dtype), dy, input_precision=DOT_PRECISION)
    dv += tl.exp(cum_last - cum)[:, None] * tl.dot(k, tl.trans(dstate_end.to(k.dtype)),
                                                   input_precision=DOT_PRECISION)
    tl.store(dv_ptr + i[:, None] * H * P + p[None, :], dv.to(dv_ptr.dtype.element_ty), mask=dy_mask)  # (C, BLOCK_P)


@triton.jit
def _rows_tile(ptr, rows, row_stride, cols, num_cols, seq_left):
    """ptr[rows * row_stride + cols]: (R, BLOCK), zero for rows past the sequence (seq_left: rows of the chunk still
    inside it) and columns past num_cols.  For q, k (row_stride G * N) and v, dy (H * P) of one chunk."""
    mask = (rows < seq_left)[:, None] & (cols[None, :] < num_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _key_row(k_ptr, row, seq_left, G, N, n):
    """k at one row of a chunk and columns n: (BLOCK_N,) float32, zero past N and past the sequence's end."""
    width = tl.where(row < seq_left, N, 0)  # the columns to read: none past the sequence's end
    return tl.load(k_ptr + row * G * N + n, mask=n < width, other=0.0).to(tl.float32)


@triton.jit
def _within_sub_chunk(q, cum, k_ptr, cum_ptr, first, seq_left, G, N, n, SUB: tl.constexpr):
    """Piece 1 inside one sub-chunk, exactly: scores[i, j] = sum_n q_i[n] k_j[n] exp(g_i[n] - g_j[n]) for j <= i,
    0 above the diagonal.  q, cum (SUB, BLOCK_N) float32: the sub-chunk's queries and g; k_ptr, cum_ptr: the chunk's
    first row; first: the sub-chunk's first row in the chunk.  -> (SUB, SUB) float32

    One key position j at a time: its column is a sum over n of elementwise products, with the exponent masked to
    -inf where i < j before exp, so exp never sees a positive number.
    """
    i = tl.arange(0, SUB)
    scores = tl.zeros((SUB, SUB), dtype=tl.float32)
    for j in range(SUB):
        k_j = _key_row(k_ptr, first + j, seq_left, G, N, n)  # (BLOCK_N,)
        decay = tl.exp(tl.where(i[:, None] >= j, cum - _cum_row(cum_ptr, first + j, n, N)[None, :], float("-inf")))
        column = tl.sum(q * k_j[None, :] * decay, axis=1)  # (SUB,)
        scores += tl.where(i[None, :] == j, column[:, None], 0.0)
    return scores


@triton.jit
def _within_sub_chunk_grads(dscores, q, cum, k_ptr, cum_ptr, first, seq_left, G, N, n, SUB: tl.constexpr):
    """The gradients of _within_sub_chunk's scores, given dscores (SUB, SUB) float32 (ignored above the diagonal):
    dq_i = sum_{j<=i} dscores_ij k_j exp(g_i - g_j) and dk_j = sum_{i>=j} dscores_ij q_i exp(g_i - g_j),
    elementwise over n.  Arguments as _within_sub_chunk.  -> dq, dk (SUB, BLOCK_N) float32"""
    i = tl.arange(0, SUB)
    dq = tl.zeros((SUB, n.shape[0]), dtype=tl.float32)
    dk = tl.zeros((SUB, n.shape[0]), dtype=tl.float32)
    for j in range(SUB):
        k_j = _key_row(k_ptr, first + j, seq_left, G, N, n)  # (BLOCK_N,)
        decay = tl.exp(tl.where(i[:, None] >= j, cum - _cum_row(cum_ptr, first + j, n, N)[None, :], float("-inf")))
        weighted = tl.sum(tl.where(i[None, :] == j, dscores, 0.0), axis=1)[:, None] * decay  # (SUB, BLOCK_N)
        dq += weighted * k_j[None, :]
        dk += tl.where(i[:, None] == j, tl.sum(weighted * q, axis=0)[None, :], 0.0)  # row j
    return dq, dk


@triton.jit
def _channel_chunk(num_chunks, L, H, G, P, N, CHUNK: tl.constexpr):
    """The per-channel programs' chunk and where their tiles start: (start, the chunk's first position; rows, the
    offset of its first row in a (B, L, G, .) tensor of group g and in a (B, L, H, .) tensor of head h, in rows;
    cum_at, its first A row in (B, H, nc*C, N); state_at, its state in (B, nc, H, P, N))."""
    chunk, b, h, g = _chunk_and_head(num_chunks, H, G)
    start = chunk * CHUNK
    group_rows, head_rows = (b * L + start) * G + g, (b * L + start) * H + h
    cum_at = ((b * H + h) * num_chunks * CHUNK + start) * N
    return start, group_rows, head_rows, cum_at, ((b * num_chunks + chunk) * H + h) * P * N


@triton.jit
def _channel_output_kernel(q_ptr, k_ptr, v_ptr, cum_ptr, states_ptr, y_ptr, L, H, G, P, N, num_chunks,
                           CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """Pieces 1 + 4 for a per-channel decay, for one chunk, one head and BLOCK_P value columns, a sub-chunk I of
    rows at a time:

        y_i = sum_{J<I} sum_{j in J} (q_i exp(g_i - g_b)) . (k_j exp(g_b - g_j)) v_j      earlier sub-chunks, b the
            + sum_{j<=i in I} (sum_n q_i k_j exp(g_i - g_j)) v_j                         row before I; I itself,
            + S_prev (q_i exp(g_i))                                                      exactly; earlier chunks

    Grid: (nc * B * H, P-blocks).
    """
    start, group_rows, head_rows, cum_at, state_at = _channel_chunk(num_chunks, L, H, G, P, N, CHUNK)
    q_ptr += group_rows * N
    k_ptr += group_rows * N
    v_ptr += head_rows * P
    y_ptr += head_rows * P
    cum_ptr += cum_at
    states_ptr += state_at
    seq_left = L - start
    s = tl.arange(0, SUB)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    state_mask = (p[:, None] < P) & (n[None, :] < N)
    entering = tl.load(states_ptr + p[:, None] * N + n[None, :], mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N)
    entering = entering.to(q_ptr.dtype.element_ty)

    for I in range(CHUNK // SUB):
        rows = I * SUB + s
        q = _rows_tile(q_ptr, rows, G * N, n, N, seq_left)  # (SUB, BLOCK_N)
        cum = _cum_tile(cum_ptr, rows, n, N)  # (SUB, BLOCK_N)
        # 4. what earlier chunks left in the state
        y = tl.dot((q * tl.exp(cum)).to(q.dtype), tl.trans(entering), input_precision=DOT_PRECISION)  # (SUB, BLOCK_P)
        # 1. earlier sub-chunks of this chunk, through the row before this one
        if I > 0:
            cum_b = _cum_row(cum_ptr, I * SUB - 1, n, N)  # (BLOCK_N,)
            q_rel = (q * tl.exp(cum - cum_b[None, :])).to(q.dtype)  # (SUB, BLOCK_N)
            for J in range(I):
                cols = J * SUB + s
                k = _rows_tile(k_ptr, cols, G * N, n, N, seq_left)  # (SUB, BLOCK_N)
                k_rel = (k * tl.exp(cum_b[None, :] - _cum_tile(cum_ptr, cols, n, N))).to(k.dtype)
                scores = tl.dot(q_rel, tl.trans(k_rel), input_precision=DOT_PRECISION)  # (SUB, SUB)
                v = _rows_tile(v_ptr, cols, H * P, p, P, seq_left)  # (SUB, BLOCK_P)
                y += tl.dot(scores.to(v.dtype), v, input_precision=DOT_PRECISION)
        # 1. this sub-chunk, exactly
        scores = _within_sub_chunk(q.to(tl.float32), cum, k_ptr, cum_ptr, I * SUB, seq_left, G, N, n, SUB)
        v = _rows_tile(v_ptr, rows, H * P, p, P, seq_left)  # (SUB, BLOCK_P)
        y += tl.dot(scores.to(v.dtype), v, input_precision=DOT_PRECISION)
        y_mask = (rows < seq_left)[:, None] & (p[None, :] < P)
        tl.store(y_ptr + rows[:, None] * H * P + p[None, :], y.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _channel_grad_v_kernel(q_ptr, k_ptr, dy_ptr, cum_ptr, dstates_ptr, dv_ptr, L, H, G, P, N, num_chunks,
                           CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """Gradient of v for a per-channel decay (pieces 1 and 2), for one chunk, one head and BLOCK_P value columns, a
    sub-chunk J of key rows at a time:

        dv_j = sum_{I>J} sum_{i in I} ((q_i exp(g_i - g_b)) . (k_j exp(g_b - g_j))) dy_i     later sub-chunks
             + sum_{i>=j in J} (sum_n q_i k_j exp(g_i - g_j)) dy_i                          J itself, exactly
             + dS_end (k_j exp(g_last - g_j))                                               the chunk's end state

    Grid: (nc * B * H, P-blocks).
    """
    start, group_rows, head_rows, cum_at, state_at = _channel_chunk(num_chunks, L, H, G, P, N, CHUNK)
    q_ptr += group_rows * N
    k_ptr += group_rows * N
    dy_ptr += head_rows * P
    dv_ptr += head_rows * P
    cum_ptr += cum_at
    dstates_ptr += state_at
    seq_left = L - start
    s = tl.arange(0, SUB)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    state_mask = (p[:, None] < P) & (n[None, :] < N)
    dstate_end = tl.load(dstates_ptr + p[:, None] * N + n[None, :], mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N)
    dstate_end = dstate_end.to(k_ptr.dtype.element_ty)
    cum_last = _cum_row(cum_ptr, CHUNK - 1, n, N)  # (BLOCK_N,)

    for J in range(CHUNK // SUB):
        cols = J * SUB + s
        k = _rows_tile(k_ptr, cols, G * N, n, N, seq_left)  # (SUB, BLOCK_N)
        cum = _cum_tile(cum_ptr, cols, n, N)  # (SUB, BLOCK_N)
        # 2. through the state at the chunk's end
        k_to_end = (k * tl.exp(cum_last[None, :] - cum)).to(k.dtype)
        dv = tl.dot(k_to_end, tl.trans(dstate_end), input_precision=DOT_PRECISION)  # (SUB, BLOCK_P)
        # 1. this sub-chunk, exactly: the scores transposed, row j and column i
        q = _rows_tile(q_ptr, cols, G * N, n, N, seq_left)
        scores = _within_sub_chunk(q.to(tl.float32), cum, k_ptr, cum_ptr, J * SUB, seq_left, G, N, n, SUB)
        dy = _rows_tile(dy_ptr, cols, H * P, p, P, seq_left).to(k.dtype)  # (SUB, BLOCK_P)
        dv += tl.dot(tl.trans(scores).to(k.dtype), dy, input_precision=DOT_PRECISION)
        # 1. later sub-chunks, each through the row before it
        for I in range(J + 1, CHUNK // SUB):
            rows = I * SUB + s
            cum_b = _cum_row(cum_ptr, I * SUB - 1, n, N)  # (BLOCK_N,)
            k_rel = (k * tl.exp(cum_b[None, :] - cum)).to(k.dtype)
            q_rel = _rows_tile(q_ptr, rows, G * N, n, N, seq_left) * tl.exp(_cum_tile(cum_ptr, rows, n, N)
                                                                             - cum_b[None, :])
            scores_t = tl.dot(k_rel, tl.trans(q_rel.to(k.dtype)), input_precision=DOT_PRECISION)  # (SUB, SUB)
            dy = _rows_tile(dy_ptr, rows, H * P, p, P, seq_left).to(k.dtype)
            dv += tl.dot(scores_t.to(k.dtype), dy, input_precision=DOT_PRECISION)
        dv_mask = (cols < seq_left)[:, None] & (p[None, :] < P)
        tl.store(dv_ptr + cols[:, None] * H * P + p[None, :], dv.to(dv_ptr.dtype.element_ty), mask=dv_mask)


@triton.jit
def _channel_grad_qk_kernel(q_ptr, k_ptr, v_ptr, dy_ptr, cum_ptr, states_ptr, dstates_ptr, dq_ptr, dk_ptr, dcum_ptr,
                            L, H, G, P, N, num_chunks,
                            CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """Gradients of q and k for a per-channel decay, from head h alone, for one chunk and BLOCK_N key columns, a
    sub-chunk X at a time. With dscores_ij = dy_i . v_j for j <= i, elementwise over n:

        dq_i = sum_{j<=i} dscores_ij k_j exp(g_i - g_j) + exp(g_i) S_prev^T dy_i               (pieces 1 and 4)
        dk_j = sum_{i>=j} dscores_ij q_i exp(g_i - g_j) + exp(g_last - g_j) dS_end^T v_j      (pieces 1 and 2)

    pairs in different sub-chunks again factored through the row b before the later one. Writes dq, dk of this
    head (B, L, H, N) float32, which the caller sums over each group's heads, and dL/dg = q dq - k dk to dcum
    (B, H, nc*C, N). Grid: (nc * B * H, N-blocks).
    """
    start, group_rows, head_rows, cum_at, state_at = _channel_chunk(num_chunks, L, H, G, P, N, CHUNK)
    q_ptr += group_rows * N
    k_ptr += group_rows * N
    v_ptr += head_rows * P
    dy_ptr += head_rows * P
    dq_ptr += head_rows * N  # per head: the caller sums each group's heads
    dk_ptr += head_rows * N
    cum_ptr += cum_at
    dcum_ptr += cum_at
    states_ptr += state_at
    dstates_ptr += state_at
    seq_left = L - start
    s = tl.arange(0, SUB)
    p = tl.arange(0, BLOCK_P)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    state_offs, state_mask = p[:, None] * N + n[None, :], (p[:, None] < P) & (n[None, :] < N)
    dtype = q_ptr.dtype.element_ty
    entering = tl.load(states_ptr + state_offs, mask=state_mask, other=0.0).to(dtype)  # (BLOCK_P, BLOCK_N)
    dstate_end = tl.load(dstates_ptr + state_offs, mask=state_mask, other=0.0).to(dtype)  # (BLOCK_P, BLOCK_N)
    cum_last = _cum_row(cum_ptr, CHUNK - 1, n, N)  # (BLOCK_N,)

    for X in range(CHUNK // SUB):
        rows = X * SUB + s
        q = _rows_tile(q_ptr, rows, G * N, n, N, seq_left)  # (SUB, BLOCK_N)
        k = _rows_tile(k_ptr, rows, G * N, n, N, seq_left)
        cum = _cum_tile(cum_ptr, rows, n, N)
        dy = _rows_tile(dy_ptr, rows, H * P, p, P, seq_left).to(dtype)  # (SUB, BLOCK_P)
        v = _rows_tile(v_ptr, rows, H * P, p, P, seq_left)
        # 4. and 2.: through the state entering the chunk and the state leaving it
        dq = tl.exp(cum) * tl.dot(dy, entering, input_precision=DOT_PRECISION)  # (SUB, BLOCK_N)
        dk = tl.exp(cum_last[None, :] - cum) * tl.dot(v, dstate_end, input_precision=DOT_PRECISION)
        # 1. pairs inside this sub-chunk, exactly
        dscores = tl.dot(dy, tl.trans(v), input_precision=DOT_PRECISION)  # (SUB, SUB)
        dq_within, dk_within = _within_sub_chunk_grads(dscores, q.to(tl.float32), cum, k_ptr, cum_ptr, X * SUB,
                                                       seq_left, G, N, n, SUB)
        dq += dq_within
        dk += dk_within
        # 1. queries here, keys in earlier sub-chunks J: through the row b before this sub-chunk
        if X > 0:
            cum_b = _cum_row(cum_ptr, X * SUB - 1, n, N)  # (BLOCK_N,)
            from_earlier = tl.zeros((SUB, BLOCK_N), dtype=tl.float32)
            for J in range(X):
                cols = J * SUB + s
                dscores = tl.dot(dy, tl.trans(_rows_tile(v_ptr, cols, H * P, p, P, seq_left)),
                                 input_precision=DOT_PRECISION)  # (SUB, SUB)
                k_rel = _rows_tile(k_ptr, cols, G * N, n, N, seq_left) * tl.exp(cum_b[None, :]
                                                                              - _cum_tile(cum_ptr, cols, n, N))
                from_earlier += tl.dot(dscores.to(dtype), k_rel.to(dtype), input_precision=DOT_PRECISION)
            dq += tl.exp(cum - cum_b[None, :]) * from_earlier
        # 1. keys here, queries in later sub-chunks I: each through the row b before I
        for I in range(X + 1, CHUNK // SUB):
            rows_i = I * SUB + s
            cum_b = _cum_row(cum_ptr, I * SUB - 1, n, N)
            dscores_t = tl.dot(v, tl.trans(_rows_tile(dy_ptr, rows_i, H * P, p, P, seq_left).to(dtype)),
                               input_precision=DOT_PRECISION)  # (SUB, SUB): row j here, column i there
            q_rel = _rows_tile(q_ptr, rows_i, G * N, n, N, seq_left) * tl.exp(_cum_tile(cum_ptr, rows_i, n, N)
                                                                              - cum_b[None, :])
            to_later = tl.dot(dscores_t.to(dtype), q_rel.to(dtype), input_precision=DOT_PRECISION)
            dk += tl.exp(cum_b[None, :] - cum) * to_later
        tile_offs = rows[:, None] * N + n[None, :]
        tl.store(dcum_ptr + tile_offs, q.to(tl.float32) * dq - k.to(tl.float32) * dk, mask=n[None, :] < N)
        qk_mask = (rows < seq_left)[:, None] & (n[None, :] < N)
        tl.store(dq_ptr + rows[:, None] * H * N + n[None, :], dq, mask=qk_mask)  # (SUB, BLOCK_N)
        tl.store(dk_ptr + rows[:, None] * H * N + n[None, :], dk, mask=qk_mask)


def _block(size, cap):
    """A power-of-two tile width: at least 16 (the smallest tl.dot operand), at most cap."""
    return min(cap, max(16, 1 << (size - 1).bit_length()))


# The widest tile (BLOCK_P, BLOCK_N) each tile kernel takes: the launches below, triton_shared_memory and the test
# that compiles the kernels for real GPUs all read this one table. Kernels whose products run over all of N (or P)
# take it in one tile, which is why P and N are at most MAX_TRITON_WIDTH.
_TILE_CAPS = {"chunk_state": (64, 64), "chunk_output": (64, 128), "grad_qk": (128, 64), "grad_v": (64, 128),
              "channel_output": (64, 128), "channel_grad_qk": (128, 64), "channel_grad_v": (64, 128)}


def _tiles(kernel, P, N):
    """(BLOCK_P, BLOCK_N) of one of the _TILE_CAPS kernels for heads of P value and N key columns."""
    cap_p, cap_n = _TILE_CAPS[kernel]
    return _block(P, cap_p), _block(N, cap_n)


def _launch_options(kernel, chunk_size):
    """num_warps (and num_stages) of a tile kernel.  From chunks of 64 on, 8 warps share the (C, C) and (C, BLOCK)
    tiles out over twice the threads, so fewer of their values spill out of the 255 registers a thread may hold. The
    per-channel kernels hold (SUB_CHUNK, BLOCK) tiles whatever the chunk: 4 warps."""
    if kernel.startswith("channel"):
        return {"num_warps": 4, "num_stages": 1}  # one stage: their loops over key rows would pipeline their loads
    options = {"num_warps": 8 if chunk_size >= 64 else 4}
    if kernel == "grad_qk":
        options["num_stages"] = 1  # its loop over heads would otherwise be software-pipelined beyond shared memory
    return options


def _dot_precision(dtype):
    """float32 inputs get exact float32 products unless the user allowed TF32 matmuls globally."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _chunk_cumsum(log_decay, chunk_size):
    """A restarted at every chunk, contiguous along positions: (B, L, H) -> (B, H, nc * C) float32, or for a
    per-channel decay (B, L, H, N) -> (B, H, nc * C, N)."""
    cum = _to_chunks(log_decay.float(), chunk_size).cumsum(2)  # (B, nc, C, H) or (B, nc, C, H, N)
    return cum.flatten(1, 2).transpose(1, 2).contiguous()


def _triton_chunk_size(chunk_size, L):
    """The chunk the kernels run with: chunk_size, or the smallest power of two >= 16 that covers a shorter sequence
    (a longer chunk would only add padding)."""
    return min(chunk_size, _block(L, chunk_size))


def _triton_chunk_sums(rows, cols, cum, chunk_size, weight_to_end):
    """What each chunk sums, for either kind of decay (cum's layout tells which): piece 2's X[c] = sum_i v_i
    (exp(g_last - g_i) k_i)^T (weight_to_end, rows = v, cols = k) or the backward's D[c] = sum_i dy_i (exp(g_i) q_i)^T
    (rows = dy, cols = q).  rows (B, L, H, P), cols (B, L, G, N) -> (B, nc, H, P, N) float32."""
    B, L, H, P = rows.shape
    G, N = cols.shape[2], cols.shape[3]
    nc = cum.shape[2] // chunk_size
    sums = torch.empty(B, nc, H, P, N, dtype=torch.float32, device=rows.device)
    block_p, block_n = _tiles("chunk_state", P, N)
    grid = (nc * B * H, triton.cdiv(P, block_p) * triton.cdiv(N, block_n))
    _chunk_state_kernel[grid](rows, cols, cum, sums, L, H, G, P, N, nc, CHUNK=chunk_size, BLOCK_P=block_p,
                              BLOCK_N=block_n, WEIGHT_TO_END=weight_to_end, PER_CHANNEL=cum.dim() == 4,
                              DOT_PRECISION=_dot_precision(cols.dtype), **_launch_options("chunk_state", chunk_size))
    return sums


def _triton_states(v, k, cum, initial_state, chunk_size):
    """Pieces 2 and 3, for either kind of decay.  Returns states (B, nc, H, P, N) holding the state entering each
    chunk, and the final state (B, H, P, N), both float32."""
    B, L, H, P = v.shape
    N = k.shape[3]
    states = _triton_chunk_sums(v, k, cum, chunk_size, weight_to_end=True)
    final = torch.empty(B, H, P, N, dtype=torch.float32, device=v.device)
    block = _block(P * N, 1024)
    _state_pass_kernel[(B * H, triton.cdiv(P * N, block))](
        states, cum, initial_state, final, H, N, P * N, states.shape[1], CHUNK=chunk_size, BLOCK=block,
        HAS_INITIAL=initial_state is not None, PER_CHANNEL=cum.dim() == 4)
    return states, final


def _triton_state_grads(dy, q, cum, states, final, dfinal, chunk_size):
    """Piece 3 backward, for either kind of decay.  Returns dS_end (B, nc, H, P, N), the gradient of the state
    leaving each chunk; the initial state's gradient (B, H, P, N); and <dS_end, S_end> per chunk, (B, H, nc) for a
    scalar decay, (B, H, nc, N) column by column for a per-channel one."""
    B, nc, H, P, N = states.shape
    per_channel = cum.dim() == 4
    dstates = _triton_chunk_sums(dy, q, cum, chunk_size, weight_to_end=False)  # D[c], made dS_end[c] below
    block = _block(P * N, 1024)
    num_blocks = triton.cdiv(P * N, block)
    end_dot = None if per_channel else torch.empty(B * H, num_blocks, nc, dtype=torch.float32, device=q.device)
    dinitial = torch.empty_like(final)
    _state_pass_backward_kernel[(B * H, num_blocks)](
        dstates, states, final, dfinal, cum, dinitial, end_dot, H, N, P * N, nc, CHUNK=chunk_size, BLOCK=block,
        PER_CHANNEL=per_channel)
    if per_channel:  # S_end[c] is the state entering chunk c + 1, or the final state
        state_end = torch.cat([states[:, 1:], final[:, None]], dim=1)
        return dstates, dinitial, (dstates * state_end).sum(3).permute(0, 2, 1, 3)  # (B, H, nc, N)
    return dstates, dinitial, end_dot.sum(1).view(B, H, nc)


def _log_decay_grad(dcum, end_dot, L, dtype):
    """d log_decay from dcum (B, H, nc * C[, N]), dL/dg_t, and end_dot (B, H, nc[, N]), <dS_end, S_end>.
    log_decay_s collects dg_t for t >= s within its chunk; <dS_end, S_end> sits at every chunk's last position, so
    after the reverse cumulative sum it reaches every position of the chunk.  -> (B, L, H[, N])"""
    B, H, nc = end_dot.shape[:3]
    dcum = dcum.view(B, H, nc, -1, *end_dot.shape[3:])  # (B, H, nc, C[, N])
    dlog_decay = dcum.flip(3).cumsum(3).flip(3) + end_dot.unsqueeze(3)
    return dlog_decay.flatten(2, 3)[:, :, :L].transpose(1, 2).to(dtype)


class _TritonScalarScan(torch.autograd.Function):
    """Forward and backward of the chunked scan with a scalar decay, each a short sequence of Triton kernels.

    Only the inputs and the final state are saved; the per-chunk states are recomputed in the backward pass, which
    costs one cheap pass and saves (B, nc, H, P, N) float32 of activation memory per layer.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, chunk_size):
        B, L, G, N = q.shape
        H, P = v.shape[2], v.shape[3]
        cum = _chunk_cumsum(log_decay, chunk_size)
        states, final = _triton_states(v, k, cum, initial_state, chunk_size)
        y = torch.empty_like(v)
        block_p, block_n = _tiles("chunk_output", P, N)
        _chunk_output_kernel[(states.shape[1] * B * H, triton.cdiv(P, block_p))](
            q, k, v, cum, states, y, L, H, G, P, N, states.shape[1], CHUNK=chunk_size, BLOCK_P=block_p,
            BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q.dtype), **_launch_options("chunk_output", chunk_size))
        ctx.save_for_backward(q, k, v, cum, initial_state, final)
        ctx.chunk_size, ctx.log_decay_dtype = chunk_size, log_decay.dtype
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        q, k, v, cum, initial_state, final = ctx.saved_tensors
        C = ctx.chunk_size
        B, L, G, N = q.shape
        H, P = v.shape[2], v.shape[3]
        dy, dfinal = dy.contiguous(), dfinal.float().contiguous()
        precision = _dot_precision(q.dtype)
        states, _ = _triton_states(v, k, cum, initial_state, C)
        dstates, dinitial, end_dot = _triton_state_grads(dy, q, cum, states, final, dfinal, C)
        nc = states.shape[1]

        # pieces 1, 2, 4 backward
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        block_p, block_n = _tiles("grad_qk", P, N)
        dcum = torch.empty(triton.cdiv(N, block_n), B, H, nc * C, dtype=torch.float32, device=q.device)
        _grad_qk_kernel[(nc * B * G, triton.cdiv(N, block_n))](
            q, k, v, dy, cum, states, dstates, dq, dk, dcum, L, H, G, P, N, nc, B, CHUNK=C,
            BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION=precision, **_launch_options("grad_qk", C))
        dv = torch.empty_like(v)
        block_p, block_n = _tiles("grad_v", P, N)
        _grad_v_kernel[(nc * B * H, triton.cdiv(P, block_p))](
            q, k, dy, cum, dstates, dv, L, H, G, P, N, nc, CHUNK=C, BLOCK_P=block_p, BLOCK_N=block_n,
            DOT_PRECISION=precision, **_launch_options("grad_v", C))

        dlog_decay = _log_decay_grad(dcum.sum(0), end_dot, L, ctx.log_decay_dtype)
        dinitial = None if initial_state is None else dinitial.to(initial_state.dtype)
        return dq, dk, dv, dlog_decay, dinitial, None


class _TritonPerChannelScan(torch.autograd.Function):
    """Forward and backward of the chunked scan with a decay per key channel: pieces 2 and 3 (and the backward pass
    over chunks) as for the scalar decay, pieces 1 + 4 and their gradients by the _channel kernels, in sub-chunks.
    The same memory plan: only the inputs and the final state are saved."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, chunk_size):
        B, L, G, N = q.shape
        H, P = v.shape[2], v.shape[3]
        cum = _chunk_cumsum(log_decay, chunk_size)  # (B, H, nc * C, N)
        states, final = _triton_states(v, k, cum, initial_state, chunk_size)
        y = torch.empty_like(v)
        block_p, block_n = _tiles("channel_output", P, N)
        _channel_output_kernel[(states.shape[1] * B * H, triton.cdiv(P, block_p))](
            q, k, v, cum, states, y, L, H, G, P, N, states.shape[1], CHUNK=chunk_size, SUB=SUB_CHUNK,
            BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q.dtype),
            **_launch_options("channel_output", chunk_size))
        ctx.save_for_backward(q, k, v, cum, initial_state, final)
        ctx.chunk_size, ctx.log_decay_dtype = chunk_size, log_decay.dtype
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        q, k, v, cum, initial_state, final = ctx.saved_tensors
        C = ctx.chunk_size
        B, L, G, N = q.shape
        H, P = v.shape[2], v.shape[3]
        dy, dfinal = dy.contiguous(), dfinal.float().contiguous()
        precision = _dot_precision(q.dtype)
        states, _ = _triton_states(v, k, cum, initial_state, C)
        dstates, dinitial, end_dot = _triton_state_grads(dy, q, cum, states, final, dfinal, C)
        nc = states.shape[1]

        # pieces 1, 2, 4 backward; dq and dk per head first, then summed over each group's heads
        dq_heads = torch.empty(B, L, H, N, dtype=torch.float32, device=q.device)
        dk_heads = torch.empty_like(dq_heads)
        dcum = torch.empty_like(cum)
        block_p, block_n = _tiles("channel_grad_qk", P, N)
        _channel_grad_qk_kernel[(nc * B * H, triton.cdiv(N, block_n))](
            q, k, v, dy, cum, states, dstates, dq_heads, dk_heads, dcum, L, H, G, P, N, nc, CHUNK=C,
            SUB=SUB_CHUNK, BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION=precision,
            **_launch_options("channel_grad_qk", C))
        dv = torch.empty_like(v)
        block_p, block_n = _tiles("channel_grad_v", P, N)
        _channel_grad_v_kernel[(nc * B * H, triton.cdiv(P, block_p))](
            q, k, dy, cum, dstates, dv, L, H, G, P, N, nc, CHUNK=C, SUB=SUB_CHUNK, BLOCK_P=block_p,
            BLOCK_N=block_n, DOT_PRECISION=precision, **_launch_options("channel_grad_v", C))

        dq = dq_heads.view(B, L, G, H // G, N).sum(3).to(q.dtype)
        dk = dk_heads.view(B, L, G, H // G, N).sum(3).to(k.dtype)
        dlog_decay = _log_decay_grad(dcum, end_dot, L, ctx.log_decay_dtype)
        dinitial = None if initial_state is None else dinitial.to(initial_state.dtype)
        return dq, dk, dv, dlog_decay, dinitial, None


MAX_TRITON_WIDTH = 128  # P and N are each read as a single tile of up to 128 columns
MAX_TRITON_CHUNK = 128  # larger chunks would not fit the backward kernels in shared memory


def triton_shared_memory(P, N, chunk_size, element_size):
    """An upper bound, in bytes, on the shared memory one program of the kernels needs, for either kind of decay:
    the tiles that tl.dot reads, all staged at once (the compiler reuses some of that space, so compiled kernels need
    at most this; a test checks it against kernels compiled for sm_80 and sm_90).  element_size: 2 when q, k, v are
    bfloat16/float16, else 4.

    Scalar decay. The q/k gradient's program holds q and k (C, BLOCK_N), v and dy (C, P), the entering state and its
    gradient (P, BLOCK_N) and the scores (C, C).  The output's (and the v gradient's) holds q and k (C, N),
    v (C, BLOCK_P), and either the entering state (BLOCK_P, N) and the scores in the input dtype or, at small chunks,
    the entering state staged in float32 before its conversion.
    Per-channel decay: tiles of a sub-chunk (S = SUB_CHUNK rows) whatever the chunk. The output's (and the v
    gradient's) holds q and k (S, N), v (S, BLOCK_P), the scores (S, S) and the state (BLOCK_P, N) staged in float32;
    the q/k gradient's the entering state and its gradient (P, BLOCK_N), one of them staged in float32, dy and v
    (S, P), q and k (S, BLOCK_N) and two (S, S) tiles of scores.
    """
    C, S, e = chunk_size, SUB_CHUNK, element_size
    p, n = _tiles("grad_qk", P, N)
    grad_qk = e * (2 * C * n + 2 * C * p + 2 * p * n + C * C)
    p, n = _tiles("chunk_output", P, N)
    output = e * (2 * C * n + C * p) + max(e * (p * n + C * C), 4 * p * n)
    p, n = _tiles("channel_output", P, N)
    channel_output = e * (2 * S * n + S * p + S * S) + 4 * p * n
    p, n = _tiles("channel_grad_qk", P, N)
    channel_grad_qk = 4 * p * n + e * (p * n + 2 * S * p + 2 * S * n + 2 * S * S)
    return max(grad_qk, output, channel_output, channel_grad_qk)


def _shared_memory_limit(device):
    """Shared memory one program may use on this GPU (bytes, the number Triton's launcher checks); None on CPU."""
    if device.type != "cuda":
        return None
    return _gpu_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _gpu_shared_memory(index):
    return triton.runtime.driver.active.utils.get_device_properties(index).get("max_shared_mem")


def _compute_dtype(q, k, v):
    """Matrix products run in bfloat16/float16 only when all of q, k, v are in it; anything else runs in float32."""
    low = {q.dtype, k.dtype, v.dtype}
    return low.pop() if len(low) == 1 and v.dtype in (torch.float16, torch.bfloat16) else torch.float32


def triton_refusal(P, N, chunk_size, compute_dtype, device):
    """Why the Triton kernels cannot run heads of these sizes on this device (a sentence), or None when they can.
    The one check of the Triton path, for either kind of decay (the shared memory bound covers both)."""
    fits_tiles = max(P, N) <= MAX_TRITON_WIDTH and 16 <= chunk_size <= MAX_TRITON_CHUNK
    if not fits_tiles or chunk_size & (chunk_size - 1):
        return (f"the triton backend needs P, N <= {MAX_TRITON_WIDTH} and chunk_size a power of two in "
                f"[16, {MAX_TRITON_CHUNK}]; got P={P}, N={N}, chunk_size={chunk_size}")
    needed = triton_shared_memory(P, N, chunk_size, compute_dtype.itemsize)
    limit = _shared_memory_limit(device)
    if limit is not None and needed > limit:
        return (f"the triton kernels need up to {needed // 1024} KiB of shared memory at P={P}, N={N}, "
                f"chunk_size={chunk_size} in {str(compute_dtype).replace('torch.', '')}; this GPU has "
                f"{limit // 1024} KiB: use a smaller chunk_size or bfloat16")
    return None


def _triton_refusal(q, k, v, chunk_size):
    """triton_refusal for these inputs.  q, k (B, L, G, N), v (B, L, H, P)."""
    return triton_refusal(v.shape[3], q.shape[3], chunk_size, _compute_dtype(q, k, v), q.device)


def _check_triton(q, k, v, chunk_size):
    """A one-line error when backend='triton' was asked for and cannot run these inputs."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before "
                           "importing triton); use backend='torch' on CPU")
    refusal = _triton_refusal(q, k, v, chunk_size)
    if refusal:
        raise ValueError(refusal + ", or backend='torch' ('auto' falls back to it by itself)")


def _scan_triton(q, k, v, log_decay, initial_state, chunk_size):
    """Runs the kernels on inputs they take (see _check_triton and _triton_refusal).  Shapes as chunked_scan."""
    output_dtype = v.dtype
    compute_dtype = _compute_dtype(q, k, v)
    q, k, v = (x.to(compute_dtype).contiguous() for x in (q, k, v))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    scan = _TritonPerChannelScan if log_decay.dim() == 4 else _TritonScalarScan
    chunk_size = _triton_chunk_size(chunk_size, q.shape[1])
    y, final_state = scan.apply(q, k, v, log_decay.contiguous(), initial_state, chunk_size)
    return y.to(output_dtype), final_state
