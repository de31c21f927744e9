"""kernels.py: the chunked scan of a gated linear recurrence, with an initial and a final state.

Every sequence mixer in this project (Mamba-2's SSD and gated linear attention) is the same recurrence. Per batch
row and head, with a state S of shape (P, N):

    S_t = exp(log_decay_t) * S_{t-1} + v_t k_t^T          (decay the memory, then write v_t at key k_t)
    y_t = S_t q_t                                         (read the memory with query q_t)
    S_{-1} = initial_state  (zeros when None)             final_state = S_{L-1}

Mamba-2 maps onto it with q and k the projections it reads and writes its state with, v its input times the step
size and log_decay the step size times a negative per-head rate (model.py spells this out in Mamba-2's own letters);
linear attention with its own q, k, v and a log forget gate (0 for no gate). The paper this project reproduces is
about S_{-1}: models trained only from the zero state fail on the states that long sequences reach, so the scan must
start from any state and hand its final state on.

Shape letters used throughout:
    B batch rows      L sequence length     H heads             P value width (Mamba-2's headdim)
    G q/k groups      R = H // G heads per group (head h reads group h // R, Mamba-2's ngroups)
    N key width (Mamba-2's d_state)         C chunk size        nc = ceil(L / C) chunks

The chunked algorithm. A step-by-step loop (scan_reference) is exact but sequential in L. Cut the sequence into
chunks of C positions; within a chunk let A_i = log_decay_0 + ... + log_decay_i (cumulative, restarted per chunk)
and let S_prev be the state entering the chunk. Unrolling the recurrence inside the chunk gives four pieces:

    1. intra-chunk output   y_i  = sum_{j<=i} exp(A_i - A_j) (q_i . k_j) v_j       a masked (C, C) "attention"
    2. per-chunk states     X    = sum_j exp(A_last - A_j) v_j k_j^T               what the chunk alone writes
    3. pass over chunks     S_end = exp(A_last) S_prev + X                         sequential, but only nc steps;
                            the initial state enters at the first chunk, the final state leaves after the last
    4. inter-chunk output   y_i += exp(A_i) S_prev q_i                             what earlier chunks contribute

Pieces 1, 2 and 4 are independent across chunks (matrix products); only piece 3 is sequential, over nc steps. Every
exponent above is a difference A_i - A_j with i >= j (or A_i itself), so with log_decay <= 0 it is <= 0: nothing
overflows however negative the decay, and since A restarts at every chunk its magnitude never grows with L. Entries
with j > i are masked to -inf before exponentiating, never computed and then zeroed.

Two implementations of the same four pieces live here, and scan_reference is the definition both are tested against:
    _scan_torch   plain PyTorch, differentiated by autograd, walking the chunks in order (fast on CPUs: every
                  intermediate stays small); activation memory O(B * H * L * C), nothing L x L.
    _scan_triton  Triton kernels for the forward and the backward, wired through torch.autograd.Function; pieces
                  1, 2 and 4 run for all chunks at once, one program per (chunk, row, head).
The public entry point is chunked_scan(..., backend="auto" | "torch" | "triton").
"""
import functools
import os

import torch
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------------------------------------------
# The definition
# ----------------------------------------------------------------------------------------------------------------

def scan_step(q, k, v, log_decay, state=None):
    """One step of the recurrence: O(1) work per token, for generation.

    q, k (B, G, N); v (B, H, P); log_decay (B, H); state (B, H, P, N) or None (zeros).
    Returns y (B, H, P) in v's dtype and the new state (B, H, P, N) in float32 (float64 for float64 inputs).
    """
    B, G, N = q.shape
    H, P = v.shape[1], v.shape[2]
    dtype = _state_dtype(v)
    if state is None:
        state = torch.zeros(B, H, P, N, dtype=dtype, device=v.device)
    q = q.to(dtype).repeat_interleave(H // G, dim=1)  # (B, H, N): head h reads group h // (H // G)
    k = k.to(dtype).repeat_interleave(H // G, dim=1)
    decay = torch.exp(log_decay.to(dtype))[:, :, None, None]  # (B, H, 1, 1)
    state = decay * state.to(dtype) + v.to(dtype)[:, :, :, None] * k[:, :, None, :]
    y = (state @ q[:, :, :, None]).squeeze(-1)  # (B, H, P)
    return y.to(v.dtype), state


def scan_reference(q, k, v, log_decay, initial_state=None, *, chunk_size=64, backend="auto"):
    """The recurrence one step at a time, in float64: the definition every fast path is tested against.

    q, k (B, L, G, N); v (B, L, H, P); log_decay (B, L, H); initial_state (B, H, P, N) or None.
    Returns y (B, L, H, P) in v's dtype and final_state (B, H, P, N) in float32 (float64 for float64 inputs).
    chunk_size and backend are accepted so that the signature matches chunked_scan; they change nothing here.
    """
    _check_inputs(q, k, v, log_decay, initial_state)
    f64 = torch.float64
    state = None if initial_state is None else initial_state.to(f64)
    outputs = []
    for t in range(q.shape[1]):
        y_t, state = scan_step(q[:, t].to(f64), k[:, t].to(f64), v[:, t].to(f64), log_decay[:, t].to(f64), state)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1).to(v.dtype), state.to(_state_dtype(v))


def _state_dtype(v):
    """The state is kept in float32 (float64 only when the inputs are float64, for tests)."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


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
    if log_decay.shape != (B, L, H):
        raise ValueError(f"log_decay must be (B, L, H) = {(B, L, H)}; got {tuple(log_decay.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, P, N):
        raise ValueError(f"initial_state must be (B, H, P, N) = {(B, H, P, N)} or None; "
                         f"got {tuple(initial_state.shape)}")
    if L < 1:
        raise ValueError("the sequence length L must be at least 1")
    return B, L, G, N


# ----------------------------------------------------------------------------------------------------------------
# The chunked algorithm in PyTorch
# ----------------------------------------------------------------------------------------------------------------

def _to_chunks(x, chunk_size):
    """(B, L, ...) -> (B, nc, C, ...), zero-padding L up to a multiple of C.

    Zero padding is harmless: a padded position has k = v = 0 (writes nothing) and log_decay = 0 (decays nothing),
    so the state after the padding equals the state after the last real token.
    """
    pad = (-x.shape[1]) % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.unflatten(1, (x.shape[1] // chunk_size, chunk_size))


def _masked_decay(cum_decay):
    """exp(A_i - A_j) for i >= j and 0 above the diagonal.  (..., C) -> (..., C, C)

    The mask is applied to the exponent (-inf) rather than to the result, so exp never sees a positive number and
    no inf * 0 = nan can arise in the backward pass.
    """
    C = cum_decay.shape[-1]
    diff = cum_decay[..., :, None] - cum_decay[..., None, :]
    causal = torch.ones(C, C, dtype=torch.bool, device=cum_decay.device).tril()
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def _scan_torch(q, k, v, log_decay, initial_state, chunk_size):
    """The chunked algorithm in PyTorch, walking the chunks in order.  Shapes as chunked_scan.

    Pieces 1, 2 and 4 are batched matrix products inside each chunk, and piece 3 is the hand-over from one
    iteration to the next. Walking the chunks (rather than materialising every chunk at once, as the Triton path
    does in parallel) keeps each intermediate small enough to stay in a CPU's cache. Heads are split as H = (G, R)
    so that q and k, which have G groups, broadcast over the R heads of their group without being copied.
    """
    with torch.autocast(q.device.type, enabled=False):  # float32 products even inside an autocast region
        return _scan_torch_chunks(q, k, v, log_decay, initial_state, chunk_size)


def _scan_torch_chunks(q, k, v, log_decay, initial_state, chunk_size):
    """The body of _scan_torch.  Shapes as chunked_scan."""
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    R, C = H // G, chunk_size
    dtype = _state_dtype(v)
    # chunk-major layouts; unbind once, because indexing chunk c inside the loop would make autograd zero-fill a
    # full-size gradient for every chunk
    q_chunks = _to_chunks(q.to(dtype), C).permute(1, 0, 3, 2, 4).unsqueeze(3).unbind(0)  # nc x (B, G, 1, C, N)
    k_chunks = _to_chunks(k.to(dtype), C).permute(1, 0, 3, 2, 4).unsqueeze(3).unbind(0)  # nc x (B, G, 1, C, N)
    v_chunks = _to_chunks(v.to(dtype), C).unflatten(3, (G, R)).permute(1, 0, 3, 4, 2, 5).unbind(0)  # (B,G,R,C,P)
    cum_decay = _to_chunks(log_decay.to(dtype), C).cumsum(2)  # A_i, restarted at every chunk: (B, nc, C, H)
    cum_chunks = cum_decay.unflatten(3, (G, R)).permute(1, 0, 3, 4, 2).unbind(0)  # nc x (B, G, R, C)

    state = (torch.zeros(B, G, R, P, N, dtype=dtype, device=v.device) if initial_state is None
             else initial_state.to(dtype).reshape(B, G, R, P, N))  # the initial state enters here
    outputs = []
    for q_c, k_c, v_c, cum in zip(q_chunks, k_chunks, v_chunks, cum_chunks):
        # 1. intra-chunk output: a causal, decay-weighted (C, C) attention inside the chunk
        scores = q_c @ k_c.transpose(-1, -2)  # (B, G, 1, C, C), shared by the R heads of a group
        y = (scores * _masked_decay(cum)) @ v_c  # (B, G, R, C, P)
        # 4. inter-chunk output: read the state entering the chunk, decayed to each position
        y = y + (q_c * torch.exp(cum)[..., None]) @ state.transpose(-1, -2)
        outputs.append(y)
        # 2. what the chunk writes, decayed to its end; 3. the hand-over to the next chunk
        decay_to_end = torch.exp(cum[..., -1:] - cum)  # (B, G, R, C)
        written = (v_c * decay_to_end[..., None]).transpose(-1, -2) @ k_c  # (B, G, R, P, N)
        state = torch.exp(cum[..., -1, None, None]) * state + written  # the final state leaves after the loop

    y = torch.stack(outputs, dim=1)  # (B, nc, G, R, C, P)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(B, -1, H, P)[:, :L]
    return y.to(v.dtype), state.reshape(B, H, P, N)


# ----------------------------------------------------------------------------------------------------------------
# The chunked algorithm in Triton
#
# Layouts: q, k (B, L, G, N), v and dy (B, L, H, P) contiguous; cum (B, H, nc*C) float32 holds A restarted per
# chunk (zero-padded, so the padding repeats A_last); states (B, nc, H, P, N) float32. Every program first moves
# each base pointer to its own batch row, chunk and head, so the tile loads below it only add offsets inside one
# chunk. Those shifts are int64: the axis-0 program id, which carries the large count (chunks x rows x heads; its
# limit is 2^31 - 1, while axes 1 and 2 stop at 65535), is widened to int64 before any offset arithmetic, so
# tensors beyond 2^31 elements are addressed correctly; axis 1 only counts a few column tiles and stays int32.
# P and N are each one tile of at most 128 columns.
#
# Forward:   _chunk_state_kernel (piece 2) -> _state_pass_kernel (piece 3) -> _chunk_output_kernel (pieces 1 + 4)
# Backward:  the same three pieces run backwards. The gradient of the state at the end of chunk c obeys
#                dS_end[c-1] = exp(A_last[c]) dS_end[c] + sum_i exp(A_i) dy_i q_i^T
#            which is piece 3 again, in reverse, fed by a piece-2-like sum (_chunk_state_kernel with dy and q).
#            Then _grad_qk_kernel and _grad_v_kernel differentiate pieces 1, 2 and 4 chunk by chunk.
#            The log_decay gradient uses an identity: inside a chunk A enters only through exp(A_i) q_i,
#            exp(-A_j) k_j and exp(A_last) S_end, so dL/dA_t = q_t.dq_t - k_t.dk_t (+ <dS_end, S_end> at the
#            chunk's last position), with dq, dk the gradients of head h alone; log_decay_s then collects
#            dA_t for t >= s in its chunk (a reverse cumulative sum).
# ----------------------------------------------------------------------------------------------------------------

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
    the sequence's end and past N, then A (C,) and A_last of head h.  start: the chunk's first position."""
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
    """exp(A_i - A_j) where i >= j, else 0; the exponent is masked before exp.  (C,) -> (C, C)"""
    i = tl.arange(0, cum.shape[0])
    return tl.exp(tl.where(i[:, None] >= i[None, :], cum[:, None] - cum[None, :], float("-inf")))


@triton.jit
def _chunk_state_kernel(rows_ptr, cols_ptr, cum_ptr, out_ptr, L, H, G, P, N, num_chunks,
                        CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        WEIGHT_TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[b, c, h] = sum_i w_i rows_i cols_i^T over chunk c: a (P, N) tile per program.

    Forward (piece 2): rows = v, cols = k, w_i = exp(A_last - A_i).  Backward: rows = dy, cols = q, w_i = exp(A_i).
    Grid: (nc * B * H, P-blocks * N-blocks).
    """
    chunk, b, h, g = _chunk_and_head(num_chunks, H, G)
    start = chunk * CHUNK
    rows_ptr += ((b * L + start) * H + h) * P
    cols_ptr += ((b * L + start) * G + g) * N
    cum_ptr += (b * H + h) * num_chunks * CHUNK + start
    out_ptr += ((b * num_chunks + chunk) * H + h) * P * N
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    i = tl.arange(0, CHUNK)
    p = (tl.program_id(1) // num_n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tl.program_id(1) % num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_seq = start + i < L
    rows_mask = in_seq[:, None] & (p[None, :] < P)
    cols_mask = in_seq[:, None] & (n[None, :] < N)
    out_mask = (p[:, None] < P) & (n[None, :] < N)

    cum = tl.load(cum_ptr + i)  # (C,)
    weight = tl.exp(tl.load(cum_ptr + CHUNK - 1) - cum) if WEIGHT_TO_END else tl.exp(cum)  # (C,)
    rows = tl.load(rows_ptr + i[:, None] * H * P + p[None, :], mask=rows_mask, other=0.0)  # (C, BLOCK_P)
    cols = tl.load(cols_ptr + i[:, None] * G * N + n[None, :], mask=cols_mask, other=0.0)  # (C, BLOCK_N)
    weighted_rows = (rows * weight[:, None]).to(cols.dtype)
    tile = tl.dot(tl.trans(weighted_rows), cols, input_precision=DOT_PRECISION)
    tl.store(out_ptr + p[:, None] * N + n[None, :], tile, mask=out_mask)  # (BLOCK_P, BLOCK_N)


@triton.jit
def _state_pass_kernel(states_ptr, cum_ptr, initial_ptr, final_ptr, H, state_size, num_chunks,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_INITIAL: tl.constexpr):
    """Piece 3, forward: S_end = exp(A_last) S_prev + X, chunk after chunk.

    On entry states[b, c, h] holds X (the chunk's own contribution); on exit it holds S_prev, the state entering
    chunk c, which is what the output kernel reads. Each program owns BLOCK entries of one (b, h) state.
    Grid: (B * H, ceil(P * N / BLOCK)).
    """
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    states_ptr += (b * num_chunks * H + h) * state_size  # chunk 0; each next chunk is H * state_size further
    cum_ptr += bh * num_chunks * CHUNK + CHUNK - 1  # A_last of chunk 0; each next chunk's is CHUNK further
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
        state = tl.exp(tl.load(cum_ptr)) * state + written
        states_ptr += H * state_size
        cum_ptr += CHUNK
    tl.store(final_ptr + offs, state, mask=valid)  # (BLOCK,)


@triton.jit
def _state_pass_backward_kernel(dstates_ptr, states_ptr, final_ptr, dfinal_ptr, cum_ptr, dinitial_ptr,
                                end_dot_ptr, H, state_size, num_chunks,
                                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Piece 3, backward: dS_end[c-1] = exp(A_last[c]) dS_end[c] + D[c], from the last chunk to the first.

    On entry dstates[b, c, h] holds D[c] = sum_i exp(A_i) dy_i q_i^T; on exit it holds dS_end[c], the gradient of
    the state leaving chunk c. Also writes this block's share of <dS_end[c], S_end[c]> (for the log_decay
    gradient) to end_dot[bh, block, c], and the initial state's gradient. Grid: (B * H, ceil(P * N / BLOCK)).
    """
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    last = ((b * num_chunks + num_chunks - 1) * H + h) * state_size  # the last chunk; each earlier one H * state_size
    dstates_ptr += last
    states_ptr += last
    cum_ptr += (bh * num_chunks + num_chunks - 1) * CHUNK + CHUNK - 1  # A_last of the last chunk
    end_dot_ptr += (bh * tl.num_programs(1) + tl.program_id(1)) * num_chunks
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
        tl.store(end_dot_ptr + num_chunks - 1 - step, tl.sum(dstate * state_end))  # ()
        # the state leaving chunk c - 1 is the state entering chunk c
        state_end = tl.load(states_ptr + offs, mask=valid, other=0.0)  # (BLOCK,)
        dstate = tl.exp(tl.load(cum_ptr)) * dstate + from_outputs
        dstates_ptr -= H * state_size
        states_ptr -= H * state_size
        cum_ptr -= CHUNK
    tl.store(dinitial_ptr + offs, dstate, mask=valid)  # (BLOCK,)


@triton.jit
def _chunk_output_kernel(q_ptr, k_ptr, v_ptr, cum_ptr, states_ptr, y_ptr, L, H, G, P, N, num_chunks,
                         CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Pieces 1 + 4: y_i = sum_{j<=i} exp(A_i - A_j)(q_i.k_j) v_j + exp(A_i) S_prev q_i for one chunk, one head and
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
    inside the program (no atomics, deterministic). Per head h, with ds_ij = exp(A_i - A_j)(dy_i . v_j), j <= i:

        dq_i += sum_j ds_ij k_j + exp(A_i) S_prev^T dy_i              (pieces 1 and 4)
        dk_j += sum_i ds_ij q_i + exp(A_last - A_j) dS_end^T v_j      (pieces 1 and 2)

    and head h's share of dL/dA_t = q_t.dq_t - k_t.dk_t over these columns goes to dcum[n_block, b, h, t].
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

        dv_j = sum_{i>=j} exp(A_i - A_j)(q_i . k_j) dy_i + exp(A_last - A_j) dS_end k_j

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


def _block(size, cap):
    """A power-of-two tile width: at least 16 (the smallest tl.dot operand), at most cap."""
    return min(cap, max(16, 1 << (size - 1).bit_length()))


# The widest tile (BLOCK_P, BLOCK_N) each tile kernel takes: the launches below, triton_shared_memory and the test
# that compiles the kernels for real GPUs all read this one table.
_TILE_CAPS = {"chunk_state": (64, 64), "chunk_output": (64, 128), "grad_qk": (128, 64), "grad_v": (64, 128)}


def _tiles(kernel, P, N):
    """(BLOCK_P, BLOCK_N) of one of the _TILE_CAPS kernels for heads of P value and N key columns."""
    cap_p, cap_n = _TILE_CAPS[kernel]
    return _block(P, cap_p), _block(N, cap_n)


def _launch_options(kernel, chunk_size):
    """num_warps (and num_stages) of a tile kernel.  From chunks of 64 on, 8 warps share the (C, C) and (C, BLOCK)
    tiles out over twice the threads, so fewer of their values spill out of the 255 registers a thread may hold."""
    options = {"num_warps": 8 if chunk_size >= 64 else 4}
    if kernel == "grad_qk":
        options["num_stages"] = 1  # its loop over heads would otherwise be software-pipelined beyond shared memory
    return options


def _dot_precision(dtype):
    """float32 inputs get exact float32 products unless the user allowed TF32 matmuls globally."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _chunk_cumsum(log_decay, chunk_size):
    """A restarted at every chunk.  (B, L, H) -> (B, H, nc * C) float32, contiguous along positions."""
    cum = _to_chunks(log_decay.float(), chunk_size).cumsum(2)  # (B, nc, C, H)
    return cum.flatten(1, 2).transpose(1, 2).contiguous()


def _triton_states(rows, cols, cum, initial_state, chunk_size):
    """Pieces 2 and 3 forward.  Returns states (B, nc, H, P, N) holding the state entering each chunk, and the
    final state (B, H, P, N), both float32."""
    B, L, H, P = rows.shape
    G, N = cols.shape[2], cols.shape[3]
    nc = cum.shape[2] // chunk_size
    states = torch.empty(B, nc, H, P, N, dtype=torch.float32, device=rows.device)
    block_p, block_n = _tiles("chunk_state", P, N)
    grid = (nc * B * H, triton.cdiv(P, block_p) * triton.cdiv(N, block_n))
    _chunk_state_kernel[grid](rows, cols, cum, states, L, H, G, P, N, nc, CHUNK=chunk_size, BLOCK_P=block_p,
                              BLOCK_N=block_n, WEIGHT_TO_END=True, DOT_PRECISION=_dot_precision(cols.dtype),
                              **_launch_options("chunk_state", chunk_size))
    final = torch.empty(B, H, P, N, dtype=torch.float32, device=rows.device)
    block = _block(P * N, 1024)
    _state_pass_kernel[(B * H, triton.cdiv(P * N, block))](
        states, cum, initial_state, final, H, P * N, nc, CHUNK=chunk_size, BLOCK=block,
        HAS_INITIAL=initial_state is not None)
    return states, final


class _TritonChunkedScan(torch.autograd.Function):
    """Forward and backward of the chunked scan, each a short sequence of Triton kernels (see the section above).

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
        nc = states.shape[1]

        # backward piece 3: D[c] = sum_i exp(A_i) dy_i q_i^T, then the reverse pass turns it into dS_end[c]
        dstates = torch.empty_like(states)
        block_p, block_n = _tiles("chunk_state", P, N)
        _chunk_state_kernel[(nc * B * H, triton.cdiv(P, block_p) * triton.cdiv(N, block_n))](
            dy, q, cum, dstates, L, H, G, P, N, nc, CHUNK=C, BLOCK_P=block_p, BLOCK_N=block_n,
            WEIGHT_TO_END=False, DOT_PRECISION=precision, **_launch_options("chunk_state", C))
        block = _block(P * N, 1024)
        num_blocks = triton.cdiv(P * N, block)
        end_dot = torch.empty(B * H, num_blocks, nc, dtype=torch.float32, device=q.device)
        dinitial = torch.empty_like(final)
        _state_pass_backward_kernel[(B * H, num_blocks)](
            dstates, states, final, dfinal, cum, dinitial, end_dot, H, P * N, nc, CHUNK=C, BLOCK=block)

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

        # log_decay_s collects dA_t for t >= s within its chunk; <dS_end, S_end> sits at every chunk's last
        # position, so after the reverse cumulative sum it reaches every position of the chunk
        dcum = dcum.sum(0).view(B, H, nc, C)
        dlog_decay = dcum.flip(-1).cumsum(-1).flip(-1) + end_dot.sum(1).view(B, H, nc, 1)
        dlog_decay = dlog_decay.flatten(2)[:, :, :L].transpose(1, 2).to(ctx.log_decay_dtype)
        dinitial = None if initial_state is None else dinitial.to(initial_state.dtype)
        return dq, dk, dv, dlog_decay, dinitial, None


MAX_TRITON_WIDTH = 128  # P and N are each read as a single tile of up to 128 columns
MAX_TRITON_CHUNK = 128  # larger chunks would not fit the backward kernels in shared memory


def triton_shared_memory(P, N, chunk_size, element_size):
    """An upper bound, in bytes, on the shared memory one program of the kernels needs: the tiles that tl.dot reads,
    all staged at once (the compiler reuses some of that space, so compiled kernels need at most this; a test checks
    it against kernels compiled for sm_80 and sm_90).  element_size: 2 when q, k, v are bfloat16/float16, else 4.

    The q/k gradient's program holds q and k (C, BLOCK_N), v and dy (C, P), the entering state and its gradient
    (P, BLOCK_N) and the scores (C, C).  The output's (and the v gradient's) holds q and k (C, N), v (C, BLOCK_P), and
    either the entering state (BLOCK_P, N) and the scores in the input dtype or, at small chunks, the entering state
    staged in float32 before its conversion.
    """
    C = chunk_size
    p, n = _tiles("grad_qk", P, N)
    grad_qk = element_size * (2 * C * n + 2 * C * p + 2 * p * n + C * C)
    p, n = _tiles("chunk_output", P, N)
    output = element_size * (2 * C * n + C * p) + max(element_size * (p * n + C * C), 4 * p * n)
    return max(grad_qk, output)


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
    """Why the Triton kernels cannot run heads of these sizes on this device (a sentence), or None when they can."""
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
    y, final_state = _TritonChunkedScan.apply(q, k, v, log_decay.contiguous(), initial_state, chunk_size)
    return y.to(output_dtype), final_state


# ----------------------------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------------------------

BACKENDS = ("auto", "torch", "triton")


def chunked_scan(q, k, v, log_decay, initial_state=None, *, chunk_size=64, backend="auto"):
    """Run the recurrence S_t = exp(log_decay_t) S_{t-1} + v_t k_t^T, y_t = S_t q_t from initial_state.

    q, k          (B, L, G, N)
    v             (B, L, H, P)   H a multiple of G; head h reads q/k group h // (H // G)
    log_decay     (B, L, H)      values <= 0
    initial_state (B, H, P, N) or None (the zero state)
    returns y (B, L, H, P) in v's dtype, final_state (B, H, P, N) in float32

    backend: "torch" (plain PyTorch, any device), "triton" (CUDA, or CPU under TRITON_INTERPRET=1; P, N <= 128,
    chunk_size a power of two in [16, 128], tiles that fit the GPU's shared memory), "auto" (triton for CUDA tensors
    when triton imports and takes these sizes, else torch). log_decay must be <= 0: the numerical safety of both
    paths rests on it. A gradient arriving on final_state flows back into every input, so callers may backpropagate
    through a carried state.
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
# Running the kernels on a CPU
# ----------------------------------------------------------------------------------------------------------------

def _widen_bfloat16_in_interpreted_dot():
    """Make tl.dot correct for bfloat16 under TRITON_INTERPRET=1 (how CI runs the kernels on CPU).

    triton's CPU interpreter stores bfloat16 as its raw 16 bits and multiplies those bits in tl.dot. Widening them
    to float32 first (a bfloat16 is the top half of a float32) gives the products the GPU computes. The kernels
    themselves are untouched; only the interpreter's dot is wrapped, and only when it has the expected shape.
    """
    from triton.runtime import interpreter
    import numpy as np

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot") or getattr(builder, "_bf16_widened", False):
        return
    original_dot = builder.create_dot

    def widen(x):
        if x.dtype == tl.bfloat16 and x.data.dtype == np.uint16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), *args, **kwargs)

    builder.create_dot, builder._bf16_widened = create_dot, True


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _widen_bfloat16_in_interpreted_dot()
