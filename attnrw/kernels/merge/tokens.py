"""The ops of ``Merge(mode="tokens")``: merge at a site and carry the reduced tokens on.

In ``tokens`` mode a site merges its ``T`` tokens into ``M`` and the
rewriter (:mod:`attnrw.rewriter.tokens`) runs the token-wise layers that
follow on the ``M`` tokens. What travels with the reduced tokens is a
*token state*:

* ``index`` (B, N) int64: the slot in ``[0, T)`` of the merged token each
  of the ``N`` original tokens belongs to;
* ``sizes`` (B, T) int64: how many original tokens each slot stands for
  (they sum to ``N``).

Three ops:

``attnrw::tokens_attention(q, k, v, attn_mask, scale, ratio, r, protect, index, sizes, impl)``
    -> ``(out, step, index_out, sizes_out)``. q (B, H, T, D), k/v (B, Hkv,
    T, D/Dv) computed from the current tokens; ``index``/``sizes`` the state
    they are in (``None``: the original tokens, ``T == N``); ``attn_mask``
    in the *original* token space (broadcastable to (B, H, N, N), or
    (B, H, 1, N) for a key padding mask) or ``None``. The site merges
    exactly :func:`~attnrw.kernels.merge.plan.exact_count` tokens by
    bipartite soft matching on the keys (token weights ``sizes``; protected
    positions and their slots never merge; padding only with padding, and
    padding pairs first: they change no real token's output), runs
    attention among the ``M`` merged tokens with the bias
    ``log Σ_{n ∈ m} exp(mask[n])`` over each merged key's original members
    (``log size`` without a mask: proportional attention; a mask that varies
    by query gives a merged query the mean of its members' rows, as in
    ``qkv`` mode), and returns the
    output (B, H, M, Dv) laid out as SDPA's, ``step`` (B, T) the slot of each
    current token, and the new state. q, k, v are merged by the mean of their
    members weighted by ``sizes``, so a merged token's projections are those
    of its merged input. ``ratio == 0`` / ``r == 0`` is dense attention.

``attnrw::merge_tokens(x, src_index, src_sizes, dst_index, dst_sizes, tok_dim, batch_dim)``
    brings a value in state ``src`` (``None``: original tokens) to the later
    state ``dst``: each merged token gets the ``src_sizes``-weighted mean of
    its members. Used for operands that join the reduced tokens, e.g. the
    residual of a block.

``attnrw::restore_tokens(x, index, tok_dim, batch_dim)``
    back to the original ``N`` tokens: each token gets its merged token's
    row. Used where a token-mixing op or a graph output needs the full
    sequence.

``tok_dim``/``batch_dim`` say where the token and batch axes are in ``x``;
equal, they name one axis holding batch × tokens (batch-major), as a linear
layer's 2-D input does. The batch axis may hold the batch times more
(batch-major, e.g. batch × heads); one of size 1 is broadcast over the
batch. All three are inference ops (no autograd formula).
"""

from __future__ import annotations

import torch

from attnrw.kernels.common.checks import check_aligned, check_mask, check_qkv
from attnrw.kernels.common.layout import empty_sdpa_layout, sdpa_layout
from attnrw.kernels.common.shapes import acc_dtype
from attnrw.kernels.merge.op import resolve_attend
from attnrw.kernels.merge.plan import MergePlan, exact_count, merge_plan
from attnrw.kernels.merge.reference import additive_mask, key_logsumexp, mean_rows, merge_rows, zero_unseen
from attnrw.kernels.merge.reference import merge_tokens as _merge

_STATE = "Tensor? index, Tensor? sizes"


def _check_state(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    index: torch.Tensor | None, sizes: torch.Tensor | None,
) -> int:
    """Raise ``ValueError`` for inputs ``tokens_attention`` does not define; returns N."""
    op = "tokens_attention"
    check_qkv(op, q, k, v)
    check_aligned(op, q, k, "merges one token set (q, k and v share their length)", "Keep cross-attention dense.")
    batch, heads, t, _ = q.shape
    if (index is None) != (sizes is None):
        raise ValueError(f"{op}: give both index and sizes (a token state) or neither")
    n = t
    if index is not None and sizes is not None:
        if index.dim() != 2 or index.shape[0] != batch or sizes.shape != (batch, t):
            raise ValueError(
                f"{op}: index {tuple(index.shape)} must be (batch, N) and sizes "
                f"{tuple(sizes.shape)} (batch, T) = ({batch}, {t})"
            )
        n = index.shape[1]
    check_mask(op, attn_mask, (batch, heads, n, n), "the original token space (batch, heads, N, N)")
    return n


def _merged_count(t: int, n: int, ratio: float, r: int, protect: list[int]) -> int:
    return t - exact_count(t, ratio, r, len({p for p in protect if 0 <= p < n}))


@torch.library.custom_op(
    "attnrw::tokens_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, float ratio, int r, int[] protect, "
    f"{_STATE}, str impl) -> (Tensor, Tensor, Tensor, Tensor)",
)
def tokens_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    ratio: float,
    r: int,
    protect: list[int],
    index: torch.Tensor | None,
    sizes: torch.Tensor | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the current tokens, attend among the merged ones, return the output and the new state.

    See the module docstring for the rule; ``impl`` picks the attention
    kernel as for ``attnrw::merged_attention``.
    """
    return tokens_attention_torch(q, k, v, attn_mask, scale, ratio, r, protect, index, sizes, impl)


def tokens_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    ratio: float,
    r: int,
    protect: list[int],
    index: torch.Tensor | None,
    sizes: torch.Tensor | None,
    impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The implementation of :func:`tokens_attention` (also its oracle)."""
    n = _check_state(q, k, v, attn_mask, index, sizes)
    batch, _, t, _ = q.shape
    dev = q.device
    if index is None or sizes is None:
        index = torch.arange(t, device=dev).expand(batch, t).contiguous()
        sizes = torch.ones(batch, t, dtype=torch.int64, device=dev)
    state = MergePlan(index, sizes)
    acc = acc_dtype(q.dtype)
    madd = None
    key_bias = None  # the current keys' bias over their members, (B, h', q', T)
    if attn_mask is not None:
        madd = additive_mask(attn_mask, acc)
        if madd.shape[2] > 1 and bool((madd == madd[:, :, :1]).all()):
            madd = madd[:, :, :1]  # the same for every query (a padding mask built as (B, 1, N, N)): one row
        madd = madd.expand(batch, madd.shape[1], madd.shape[2], n)
        key_bias = key_logsumexp(madd, state)[0]
    prot_pos = sorted({p for p in protect if 0 <= p < n})
    protected = torch.zeros(batch, t, dtype=torch.bool, device=dev)
    if prot_pos:
        protected.scatter_(1, index[:, prot_pos], True)
    want = exact_count(t, ratio, r, len(prot_pos))
    if want == 0 and t == n:  # nothing merges, nothing merged before: dense attention, as written
        out = resolve_attend(impl, dev)(q, k, v, attn_mask, scale)
        step = torch.arange(t, device=dev).expand(batch, t).contiguous()
        return sdpa_layout(out.to(q.dtype)), step, index.clone(), sizes.clone()
    step = merge_plan(k, key_bias, 0.0, want, [], sizes=sizes, protected=protected, exact=True, padding_first=True)
    new_state = MergePlan(step.index.gather(1, index), step.sizes)
    if madd is None:
        bias = step.sizes.to(acc).log()[:, None, None, :]
    else:
        bias = key_logsumexp(madd, new_state)[0]
        if bias.shape[2] > 1:  # a mask that varies by query: a merged query's row is its members' mean
            bias = merge_rows(bias, new_state)
    flat = step.flat_index()
    qm, km, vm = (_merge(x, step, flat, sizes) for x in (q, k, v))
    out = resolve_attend(impl, dev)(qm, km, vm, bias, scale)
    if madd is not None:
        out = zero_unseen(out, bias)
    # Outputs of a custom op may not alias its inputs: with nothing to merge the plan passes sizes through.
    new_sizes = new_state.sizes.clone() if new_state.sizes is sizes else new_state.sizes
    return sdpa_layout(out.to(q.dtype)), step.index, new_state.index, new_sizes


@tokens_attention.register_fake
def _tokens_attention_fake(q, k, v, attn_mask, scale, ratio, r, protect, index, sizes, impl):
    n = _check_state(q, k, v, attn_mask, index, sizes)
    batch, _, t, _ = q.shape
    m = _merged_count(t, n, ratio, r, protect)
    out = empty_sdpa_layout(q.new_empty((batch, q.shape[1], m, 1)), v.shape[-1])
    i64 = dict(dtype=torch.int64, device=q.device)
    return out, q.new_empty((batch, t), **i64), q.new_empty((batch, n), **i64), q.new_empty((batch, m), **i64)


def _rows(x: torch.Tensor, tok_dim: int, batch_dim: int, batch: int) -> tuple[torch.Tensor, list[int]]:
    """x -> (batch, tokens, features), and the shape to move back from (tokens at 1, or batch·tokens at 0).

    A batch axis that holds the batch times more (batch-major, e.g. batch ×
    heads) is split first; one of size 1 is broadcast over the batch.
    """
    if tok_dim == batch_dim:
        moved = x.movedim(tok_dim, 0)
        return moved.reshape(batch, -1, *moved.shape[1:]).flatten(2), list(moved.shape)
    if x.shape[batch_dim] == 1 and batch > 1:
        x = x.expand(*[batch if d == batch_dim else -1 for d in range(x.dim())])
    moved = x.movedim((batch_dim, tok_dim), (0, 1))
    return moved.reshape(batch, -1, moved.shape[1], *moved.shape[2:]).transpose(1, 2).flatten(2), list(moved.shape)


def _unrows(rows: torch.Tensor, shape: list[int], tok_dim: int, batch_dim: int) -> torch.Tensor:
    batch, tokens = rows.shape[:2]
    if tok_dim == batch_dim:
        return rows.reshape(batch * tokens, *shape[1:]).movedim(0, tok_dim).contiguous()
    folded = rows.reshape(batch, tokens, -1, *shape[2:]).transpose(1, 2).flatten(0, 1)
    return folded.movedim((0, 1), (batch_dim, tok_dim)).contiguous()


def _out_shape(x: torch.Tensor, tok_dim: int, batch_dim: int, batch: int, tokens: int) -> list[int]:
    shape = list(x.shape)
    if tok_dim == batch_dim:
        shape[tok_dim] = batch * tokens
    else:
        shape[batch_dim], shape[tok_dim] = max(batch, shape[batch_dim]), tokens
    return shape


def _check_dims(op: str, x: torch.Tensor, tok_dim: int, batch_dim: int, batch: int, tokens: int) -> None:
    if not (0 <= tok_dim < x.dim() and 0 <= batch_dim < x.dim()):
        raise ValueError(f"{op}: tok_dim {tok_dim} / batch_dim {batch_dim} out of range for {x.dim()}-D input")
    if tok_dim == batch_dim:
        ok = x.shape[tok_dim] == batch * tokens
    else:
        ok = x.shape[tok_dim] == tokens and (x.shape[batch_dim] == 1 or x.shape[batch_dim] % batch == 0)
    if not ok:
        raise ValueError(
            f"{op}: input {tuple(x.shape)} does not hold {tokens} tokens at dim {tok_dim} and batch {batch} "
            f"at dim {batch_dim}"
        )


@torch.library.custom_op(
    "attnrw::merge_tokens",
    mutates_args=(),
    schema="(Tensor x, Tensor? src_index, Tensor? src_sizes, Tensor dst_index, Tensor dst_sizes, int tok_dim, "
    "int batch_dim) -> Tensor",
)
def merge_tokens(
    x: torch.Tensor,
    src_index: torch.Tensor | None,
    src_sizes: torch.Tensor | None,
    dst_index: torch.Tensor,
    dst_sizes: torch.Tensor,
    tok_dim: int,
    batch_dim: int,
) -> torch.Tensor:
    """``x`` in state ``src`` (None: the original tokens) -> state ``dst`` (weighted means of members)."""
    batch, n = dst_index.shape
    t = n if src_index is None else src_sizes.shape[1]  # type: ignore[union-attr]
    _check_dims("merge_tokens", x, tok_dim, batch_dim, batch, t)
    rows, shape = _rows(x, tok_dim, batch_dim, batch)
    # The slot in dst of each src token: its members' dst slot (a merge never splits a src token).
    step = dst_index if src_index is None else torch.zeros_like(src_sizes).scatter_(1, src_index, dst_index)
    plan = MergePlan(step, dst_sizes)
    sums = mean_rows(rows.flatten(0, 1), plan, plan.flat_index(), src_sizes)
    return _unrows(sums.view(batch, plan.num_tokens, -1).to(x.dtype), shape, tok_dim, batch_dim)


@merge_tokens.register_fake
def _merge_tokens_fake(x, src_index, src_sizes, dst_index, dst_sizes, tok_dim, batch_dim):
    batch, n = dst_index.shape
    t = n if src_index is None else src_sizes.shape[1]
    _check_dims("merge_tokens", x, tok_dim, batch_dim, batch, t)
    return x.new_empty(_out_shape(x, tok_dim, batch_dim, batch, dst_sizes.shape[1]))


@torch.library.custom_op(
    "attnrw::restore_tokens", mutates_args=(), schema="(Tensor x, Tensor index, int tok_dim, int batch_dim) -> Tensor"
)
def restore_tokens(x: torch.Tensor, index: torch.Tensor, tok_dim: int, batch_dim: int) -> torch.Tensor:
    """Reduced tokens -> the original ``N``: each token takes its merged token's row."""
    batch, n = index.shape
    m = x.shape[tok_dim] // batch if tok_dim == batch_dim else x.shape[tok_dim]
    _check_dims("restore_tokens", x, tok_dim, batch_dim, batch, m)
    rows, shape = _rows(x, tok_dim, batch_dim, batch)
    flat = (index + torch.arange(batch, device=x.device)[:, None] * m).flatten()
    out = rows.flatten(0, 1).index_select(0, flat)
    return _unrows(out.view(batch, n, -1), shape, tok_dim, batch_dim)


@restore_tokens.register_fake
def _restore_tokens_fake(x, index, tok_dim, batch_dim):
    batch, n = index.shape
    m = x.shape[tok_dim] // batch if tok_dim == batch_dim else x.shape[tok_dim]
    _check_dims("restore_tokens", x, tok_dim, batch_dim, batch, m)
    return x.new_empty(_out_shape(x, tok_dim, batch_dim, batch, n))
