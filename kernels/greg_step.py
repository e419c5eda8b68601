"""The whole regularization step of a model in one Triton launch.

Every layer's weight is viewed as [A, G, B] (groups on the middle axis; rows of A SA elements apart,
so that a run of a parameter's columns is walked in place). The launch walks a work
list of (layer, first group, first row of A, first element of B); each program owns a [BLOCK_G,
BLOCK_B] tile of groups x inner elements and loops over up to B_STEP elements of B and A_STEP rows
of A, so that no program is much longer than the others (a GPU waits for the last one). Launches
that want scores take whole axes instead (A_STEP = B_STEP = 0): one program per group, so the sums
do not depend on the order of atomics and the pruning decisions are reproducible.

Per element it reads w and grad and writes grad (MODE_PENALTY: grad += λ_g w), or reads w, grad
and the momentum buffer and writes w and the buffer (MODE_SGD: d = grad + λ_g w + wd w;
m = μ m + d; w -= lr m), all in fp32. Scores (sum |w| per group) leave the same pass through one
atomic add per group. Traffic: penalty 3 passes (r w, r g, w g) over the groups whose λ is not 0
(plus r w of the others when scores are wanted), fused SGD 5 (r w, r g, r m, w m, w w); tables and
λ are O(layers).

The tensors' addresses come from tables, so the compiler knows nothing of their alignment; the
launcher passes VEC (elements per 16-byte access) when every address and every row length of the
launch allows it, and the kernel restates that as hints so that loads and stores are 128-bit.
UNIT_B (weight granularity: B = 1) makes the group axis the contiguous one; STRIDED reads each
layer's row stride (runs of a parameter's columns; else rows are G·B apart, one register fewer).
CROSS (penalties of a coupled group with penalize="group") takes a parameter's row slices and its
column slices in one launch, although they share entries: a grid has no barrier, so a shared entry
belongs to the row's program, which adds the column's λ after the row's (the order of eager's two
passes) and keeps it only if both are kept; a column program skips the rows a row slice owns.
A capturable step decides on the device: MASK_FROM_FLAG reads whether to mask from memory and runs
the masked or the plain body accordingly (both compiled into the one kernel), and SKIP_FLAG makes MODE_SGD write nothing when
its flag is set (a non-finite step), so one launch, or one captured graph, serves every step.
"""
import triton
import triton.language as tl

# What one launch does (MODE); constexpr so that the kernel can name them.
MODE_SCORES = tl.constexpr(0)   # read w, sum |w| per group
MODE_PENALTY = tl.constexpr(1)  # grad += λ_g w (after pruning: zero the removed groups)
MODE_SGD = tl.constexpr(2)      # penalty, weight decay, momentum and the SGD update of w
# Whether a step zeroes the removed groups (MASK): decided on the host, or read from a flag in
# memory (a capturable schedule decides on the device, and a captured graph replays one launch).
MASK_OFF = tl.constexpr(0)
MASK_ON = tl.constexpr(1)
MASK_FROM_FLAG = tl.constexpr(2)


@triton.jit
def _aligned(address, ELEM: tl.constexpr, VEC: tl.constexpr):
    ptr = address.to(tl.pointer_type(ELEM))
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _kept_groups(kept_table, layer, offs_g, g_in, PACKED: tl.constexpr):
    """The layer's kept flags of groups ``offs_g``: bool masks, or PACKED one bit per weight (bit k
    of byte b is group 8b + k)."""
    if PACKED:
        kept_ptr = tl.load(kept_table + layer).to(tl.pointer_type(tl.uint8))
        byte = tl.load(kept_ptr + (offs_g >> 3), mask=g_in, other=255)
        kept = ((byte >> (offs_g & 7).to(tl.uint8)) & 1) != 0
    else:
        kept_ptr = tl.load(kept_table + layer).to(tl.pointer_type(tl.int8))
        kept = tl.load(kept_ptr + offs_g, mask=g_in, other=1) != 0
    return kept


@triton.jit
def _penalty_tile(w_ptr, g_ptr, idx, inside, lam, kept, free, xlam_ptr, xkeep_ptr, has_x, offs_b, B,
                  ELEM: tl.constexpr, MASK: tl.constexpr, SCORES: tl.constexpr, UNIT_B: tl.constexpr,
                  CROSS: tl.constexpr):
    """MODE_PENALTY on one tile: grad += λ w (a CROSS launch adds its column's λ where the row is
    ``free``); after pruning (MASK) the removed entries of w and grad are zeroed. Returns w as read."""
    if UNIT_B:  # single weights: their sectors are fetched anyway, and a per-lane mask
        touched = inside  # would stop 128-bit access
    else:
        # groups with λ = 0 (GReg-1's kept ones) need no gradient traffic; masked-off
        # lanes touch no memory, so they cost nothing but the scores' read of w
        touched = inside & (lam != 0.0)[:, None]
        mine = inside  # the entries this program writes
        keep = kept[:, None]
        if CROSS:
            b_in = (offs_b < B) & has_x
            xlam = tl.load(xlam_ptr + offs_b, mask=b_in, other=0.0)
            xkeep = tl.load(xkeep_ptr + offs_b, mask=b_in, other=1) != 0
            keep = keep & xkeep[None, :]
            mine = inside & free
            touched = (touched | (inside & (xlam != 0.0)[None, :])) & free
        if MASK != MASK_OFF:
            touched = touched | (mine & ~keep)
    w = tl.load(w_ptr + idx, mask=inside if SCORES else touched, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=touched, other=0.0).to(tl.float32)
    g = g + w * lam[:, None]
    if CROSS:  # after the row's λ, as eager adds the rows' pass before the columns'
        g = g + w * xlam[None, :]
    if MASK != MASK_OFF:
        if UNIT_B:  # rewrite every weight: a per-lane mask would stop 128-bit stores
            g = tl.where(kept[:, None], g, 0.0)
            tl.store(w_ptr + idx, tl.where(kept[:, None], w, 0.0).to(ELEM), mask=inside)
        else:
            g = tl.where(keep, g, 0.0)
            tl.store(w_ptr + idx, tl.zeros_like(w).to(ELEM), mask=mine & ~keep)
    tl.store(g_ptr + idx, g.to(ELEM), mask=touched)
    return w


@triton.jit
def _sgd_tile(w, w_ptr, g_ptr, m_ptr, idx, inside, writes, lam, kept, lr, mu, wd,
              ELEM: tl.constexpr, MASK: tl.constexpr, HAS_MOMENTUM: tl.constexpr, SKIP_FLAG: tl.constexpr):
    """MODE_SGD on one tile (w as read): the penalty, weight decay, momentum and the SGD update;
    nothing written where ``writes`` is false (SKIP_FLAG)."""
    written = inside
    if SKIP_FLAG:
        written = inside & writes
    g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    d = g + w * lam[:, None]
    d = d + w * wd
    if HAS_MOMENTUM:
        m = tl.load(m_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        m = (m * mu + d).to(ELEM).to(tl.float32)
        if MASK != MASK_OFF:
            m = tl.where(kept[:, None], m, 0.0)
        tl.store(m_ptr + idx, m.to(ELEM), mask=written)
        d = m
    w = w - lr * d
    if MASK != MASK_OFF:
        w = tl.where(kept[:, None], w, 0.0)
    tl.store(w_ptr + idx, w.to(ELEM), mask=written)


@triton.jit
def _step_body(scores_ptr, w_table, g_table, m_table, kept_table, xlam_table, xkeep_table, own_table, dims_ptr,
               score_off_ptr, lam_kept_ptr, lam_sel_ptr, hyper_ptr, work_ptr, skip_flag_ptr,
               ELEM: tl.constexpr, MODE: tl.constexpr, MASK: tl.constexpr, SCORES: tl.constexpr,
               PACKED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr,
               A_STEP: tl.constexpr, B_STEP: tl.constexpr, VEC: tl.constexpr, UNIT_B: tl.constexpr,
               STRIDED: tl.constexpr, CROSS: tl.constexpr, SKIP_FLAG: tl.constexpr):
    """The kernel's work with MASK decided (MASK_OFF or MASK_ON); arguments as the kernel's."""
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.load(work_ptr + pid * 4)
    g0 = tl.multiple_of(tl.load(work_ptr + pid * 4 + 1), BLOCK_G)
    a0 = tl.load(work_ptr + pid * 4 + 2)
    A = tl.load(dims_ptr + layer * 4)
    G = tl.load(dims_ptr + layer * 4 + 1)
    # `x // VEC * VEC` is x itself (the launcher checked): it tells the compiler x % VEC == 0
    if UNIT_B:
        B = 1
        G = G // VEC * VEC
        b_start = 0
    else:
        B = tl.load(dims_ptr + layer * 4 + 2) // VEC * VEC
        b_start = tl.multiple_of(tl.load(work_ptr + pid * 4 + 3), BLOCK_B)
    w_ptr = _aligned(tl.load(w_table + layer), ELEM, VEC)

    offs_g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
    g_in = offs_g < G
    if MODE != MODE_SCORES:
        g_ptr = _aligned(tl.load(g_table + layer), ELEM, VEC)
        kept = _kept_groups(kept_table, layer, offs_g, g_in, PACKED)
        lam = tl.where(kept, tl.load(lam_kept_ptr + layer), tl.load(lam_sel_ptr + layer))
        if CROSS:  # MODE_PENALTY over a parameter's rows and columns in one launch
            x_address = tl.load(xlam_table + layer)
            has_x = x_address != 0
            xlam_ptr = x_address.to(tl.pointer_type(tl.float32))
            xkeep_ptr = tl.load(xkeep_table + layer).to(tl.pointer_type(tl.int8))
            own_address = tl.load(own_table + layer)
            has_own = own_address != 0
            own_ptr = own_address.to(tl.pointer_type(tl.int8))
        else:  # unread without CROSS: defined for the tile's call
            has_x, xlam_ptr, xkeep_ptr = False, lam_kept_ptr, kept_table
        if MODE == MODE_SGD:
            lr = tl.load(hyper_ptr + layer * 3)
            mu = tl.load(hyper_ptr + layer * 3 + 1)
            wd = tl.load(hyper_ptr + layer * 3 + 2)
            m_ptr = w_ptr  # unread without momentum: defined for the tile's call
            if HAS_MOMENTUM:
                m_ptr = _aligned(tl.load(m_table + layer), ELEM, VEC)
    writes = True
    if SKIP_FLAG:
        writes = tl.load(skip_flag_ptr) == 0
    acc = tl.zeros([BLOCK_G], dtype=tl.float32)
    a_end = A if A_STEP == 0 else tl.minimum(a0 + A_STEP, A)
    b_end = B if B_STEP == 0 else tl.minimum(b_start + B_STEP, B)
    if STRIDED:  # runs of a parameter's columns: rows of A further apart than G·B
        SA = tl.load(dims_ptr + layer * 4 + 3) // VEC * VEC
    else:
        SA = G * B
    for a in range(a0, a_end):
        row = a * SA + offs_g * B
        free = True
        if CROSS:  # a row that a row slice owns: that program adds this column's λ, not this one
            free = tl.load(own_ptr + a, mask=has_own, other=0) == 0
        for b0 in range(b_start, b_end, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            inside = g_in[:, None] & (offs_b < B)[None, :]
            idx = row[:, None] + offs_b[None, :]
            if MODE == MODE_PENALTY:
                w = _penalty_tile(w_ptr, g_ptr, idx, inside, lam, kept, free, xlam_ptr, xkeep_ptr, has_x, offs_b, B,
                                  ELEM, MASK, SCORES, UNIT_B, CROSS)
            else:
                w = tl.load(w_ptr + idx, mask=inside, other=0.0).to(tl.float32)
                if MODE == MODE_SGD:
                    _sgd_tile(w, w_ptr, g_ptr, m_ptr, idx, inside, writes, lam, kept, lr, mu, wd,
                              ELEM, MASK, HAS_MOMENTUM, SKIP_FLAG)
            if SCORES:
                acc += tl.sum(tl.abs(w), axis=1)
    if SCORES:
        off = tl.load(score_off_ptr + layer)
        tl.atomic_add(scores_ptr + off + offs_g, acc, mask=g_in)


@triton.jit
def _greg_step_kernel(
    scores_ptr,                      # fp32 [sum G], zeroed: per-group sum |w| (atomics)
    w_table, g_table, m_table,       # int64 [L]: addresses of weights, grads, momentum buffers
    kept_table,                      # int64 [L]: addresses of bool masks [G] (PACKED: uint8 bits [G/8])
    xlam_table, xkeep_table,         # int64 [L] (CROSS): a row slice's fp32 λ and int8 kept per B position
                                     # (its parameter's penalized columns), or 0
    own_table,                       # int64 [L] (CROSS): a column slice's int8 flags per row of A, set
                                     # where a row slice of the launch owns the row, or 0
    dims_ptr,                        # int64 [L, 4]: A, G, B, and the stride of A (G·B, or more for columns)
    score_off_ptr,                   # int64 [L]: offset of the layer's groups in scores
    lam_kept_ptr, lam_sel_ptr,       # fp32 [L]
    hyper_ptr,                       # fp32 [L, 3]: lr, momentum, weight decay (MODE_SGD)
    work_ptr,                        # int64 [programs, 4]: layer, g0, a0, b0
    mask_flag_ptr, skip_flag_ptr,    # bool [1] (MASK_FROM_FLAG; SKIP_FLAG: MODE_SGD writes nothing when set)
    ELEM: tl.constexpr, MODE: tl.constexpr, MASK: tl.constexpr, SCORES: tl.constexpr, PACKED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, A_STEP: tl.constexpr,
    B_STEP: tl.constexpr, VEC: tl.constexpr, UNIT_B: tl.constexpr, STRIDED: tl.constexpr, CROSS: tl.constexpr,
    SKIP_FLAG: tl.constexpr,
):
    # MASK_FROM_FLAG: the flag picks the masked or the plain body at run time (both compiled), so
    # that each keeps the registers of its host-mode specialization (one body that masked by a
    # loaded flag needed more: ptxas spilled 8 bytes on sm_90 and sm_80)
    if MASK == MASK_FROM_FLAG:
        if tl.load(mask_flag_ptr) != 0:
            _step_body(scores_ptr, w_table, g_table, m_table, kept_table, xlam_table, xkeep_table, own_table,
                       dims_ptr, score_off_ptr, lam_kept_ptr, lam_sel_ptr, hyper_ptr, work_ptr, skip_flag_ptr,
                       ELEM, MODE, MASK_ON, SCORES, PACKED, HAS_MOMENTUM, BLOCK_G, BLOCK_B, A_STEP, B_STEP, VEC,
                       UNIT_B, STRIDED, CROSS, SKIP_FLAG)
        else:
            _step_body(scores_ptr, w_table, g_table, m_table, kept_table, xlam_table, xkeep_table, own_table,
                       dims_ptr, score_off_ptr, lam_kept_ptr, lam_sel_ptr, hyper_ptr, work_ptr, skip_flag_ptr,
                       ELEM, MODE, MASK_OFF, SCORES, PACKED, HAS_MOMENTUM, BLOCK_G, BLOCK_B, A_STEP, B_STEP, VEC,
                       UNIT_B, STRIDED, CROSS, SKIP_FLAG)
    else:
        _step_body(scores_ptr, w_table, g_table, m_table, kept_table, xlam_table, xkeep_table, own_table,
                   dims_ptr, score_off_ptr, lam_kept_ptr, lam_sel_ptr, hyper_ptr, work_ptr, skip_flag_ptr,
                   ELEM, MODE, MASK, SCORES, PACKED, HAS_MOMENTUM, BLOCK_G, BLOCK_B, A_STEP, B_STEP, VEC,
                   UNIT_B, STRIDED, CROSS, SKIP_FLAG)


def launch(scores, w_table, g_table, m_table, kept_table, xlam_table, xkeep_table, own_table, dims, score_off,
           lam_kept, lam_sel, hyper, work, mask_flag, skip_flag, *, elem, mode, mask, want_scores, packed,
           has_momentum, tiling, vec, unit_b, strided, cross=False, skip=False, num_warps=4) -> "Direct | None":
    """One launch over the whole work list (``work``: int64 [programs, 4]; ``tiling``: BLOCK_G,
    BLOCK_B, A_STEP, B_STEP; ``mask``: MASK_OFF, MASK_ON or MASK_FROM_FLAG, read from ``mask_flag``;
    ``skip``: read ``skip_flag``). Returns the compiled specialization as a :class:`Direct` for the
    launches after it (None under the interpreter, or where Triton's runner is not the one checked)."""
    block_g, block_b, a_step, b_step = tiling
    constexprs = dict(ELEM=elem, MODE=mode, MASK=mask, SCORES=want_scores, PACKED=packed, HAS_MOMENTUM=has_momentum,
                      BLOCK_G=block_g, BLOCK_B=block_b, A_STEP=a_step, B_STEP=b_step, VEC=vec, UNIT_B=unit_b,
                      STRIDED=strided, CROSS=cross, SKIP_FLAG=skip)
    grid = (work.shape[0],)
    compiled = _greg_step_kernel[grid](
        scores, w_table, g_table, m_table, kept_table, xlam_table, xkeep_table, own_table, dims, score_off, lam_kept,
        lam_sel, hyper, work, mask_flag, skip_flag, **constexprs, num_warps=num_warps)
    return Direct(compiled, grid, constexprs) if compiled is not None and DIRECT_OK else None


# Triton 3.8's CompiledKernel[grid] runner takes every argument of the signature in order
# (constexprs included, which the launcher skips): checked in its jit.py and nvidia driver.py.
# Other versions, or a runner that refuses the arguments once, get the full launch.
DIRECT_OK = tuple(map(int, triton.__version__.split(".")[:2])) == (3, 8)


class Direct:
    """A compiled specialization with its grid and constexprs bound: ``direct(*tensors)`` launches
    it through the compiled kernel's own runner, without what Triton's ``kernel[grid](...)`` does
    first (bind the arguments, compute the specialization key, look up the cache; several µs with
    this many arguments). Valid only for tensors like the ones it was compiled for: the same
    dtypes and the same 16-byte alignment (the caller checks what may change between launches)."""
    __slots__ = ("_run", "_constexprs")

    def __init__(self, compiled, grid: tuple, constexprs: dict):
        names = _greg_step_kernel.arg_names
        self._constexprs = tuple(constexprs[n] for n in names[names.index("ELEM"):])
        # the runner reads grid[0], grid[1] and grid[2]; it launches on the current device's current stream
        self._run = compiled[(*grid, 1, 1)[:3]]

    def __call__(self, *tensors) -> None:
        self._run(*tensors, *self._constexprs)
