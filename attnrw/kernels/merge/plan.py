"""Which tokens ``attnrw::merged_attention`` merges: input checks and bipartite soft matching.

The plan depends only on the keys, the mask and the integer arguments, and
is a constant for autograd (the selection is discrete). The PyTorch path,
the Triton path and the backward all compute it here, so they agree to the
token on which tokens are merged.

Notation: ``N`` the number of tokens merged over (the keys, ``kv_len``),
``M = N - merged`` the number of merged tokens, ``B`` the batch.

**Matching** (ToMe's bipartite soft matching, repeated in rounds):

* the metric of a token is its key averaged over the kv heads (fp32); the
  similarity of two tokens is the cosine of their metrics;
* the current tokens are split alternately into set A (even places, 0, 2,
  ...) and set B (odd places); every A token finds its most similar B token;
* the A tokens with the highest best similarity are merged into their B
  partners (descending similarity; ties go to the earlier A token);
* a merged token's metric is the mean of its members' metrics (what ToMe's
  size-weighted average gives) and the next round, if any, matches the
  merged tokens the same way.

One round can merge at most the A half, so a count above about N / 2 takes
more rounds (each a new alternating split of the merged tokens; a merged
token takes the place of the B token that received the merge, so tokens
keep their relative order). Every batch element merges the same
number of tokens in every round: the smallest number of eligible A tokens
over the batch (this needs one host sync per round). Merging stops early
when no A token is eligible, so ``merged <= requested``.

**Protected tokens** (``protect``, positions in ``[0, N)``; larger ones
protect nothing) are never merged: they are neither a source (an A token
that merges away) nor a target (a B token that receives one). They keep
size 1 and a slot of their own.

**Padding.** A key is padding when the mask forbids it for every query of
every head (bool mask: False; float mask: ``<= -1e4``). Padding tokens are
only matched with padding tokens and real tokens only with real tokens, so
a merged token is all padding or all real. (How the mask follows merged
tokens is in :mod:`attnrw.kernels.merge.reference`.)

The result, :class:`MergePlan`, gives every original token the slot of the
merged token it belongs to, and every merged token its size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnrw.kernels.common.checks import check_aligned, check_choice, check_mask, check_qkv
from attnrw.kernels.common.shapes import as_4d

#: An additive mask entry at or below this forbids the key (HF uses finfo.min or -1e4..-1e9).
PADDING_THRESHOLD = -1e4

MODES = ("kv", "qkv")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    ratio: float,
    r: int,
    mode: str,
    protect: list[int],
) -> None:
    """Raise ``ValueError`` for inputs ``merged_attention`` does not define.

    q (batch, heads, q_len, head_dim), k (batch, kv_heads, kv_len, head_dim),
    v (batch, kv_heads, kv_len, v_dim), ``heads % kv_heads == 0``; ``attn_mask``
    bool or float, broadcastable to (batch, heads, q_len, kv_len). ``"qkv"``
    needs q_len == kv_len.
    """
    op = "merged_attention"
    if is_causal:
        raise ValueError(
            f"{op} does not support is_causal=True: merging keys across positions breaks "
            "causality; keep causal attention dense"
        )
    check_qkv(op, q, k, v)
    check_choice(op, "mode", mode, MODES)
    if mode == "qkv":
        check_aligned(
            f"{op} mode 'qkv'", q, k, "merges queries and keys as one token set", "Use mode 'kv' for cross-attention."
        )
    if r < -1:
        raise ValueError(f"{op}: r must be >= 0, or -1 to use ratio; got {r}")
    if r == -1 and not (0.0 <= ratio < 1.0):
        raise ValueError(f"{op}: ratio must be in [0, 1), got {ratio}")
    if any(p < 0 for p in protect):
        raise ValueError(f"{op}: protect lists token positions >= 0, got {list(protect)}")
    check_mask(op, attn_mask, (*q.shape[:3], k.shape[-2]))


def merge_count(num_tokens: int, ratio: float, r: int) -> int:
    """Tokens asked to be merged away: ``r``, or ``round(ratio · N)`` (halves up) when ``r == -1``."""
    want = r if r >= 0 else math.floor(ratio * num_tokens + 0.5)
    return max(0, min(want, num_tokens))


def key_padding(attn_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """(batch, kv_len) bool: keys the mask forbids for every query of every head; None without a mask."""
    if attn_mask is None:
        return None
    m4 = as_4d(attn_mask)
    forbidden = ~m4 if m4.dtype == torch.bool else m4 <= PADDING_THRESHOLD
    return forbidden.all(dim=2).all(dim=1).expand(batch, kv_len)


@dataclass(frozen=True)
class MergePlan:
    """The merge of ``N`` tokens into ``M`` per batch element.

    ``index`` (B, N) int64: slot in ``[0, M)`` of the merged token each token
    belongs to; ``sizes`` (B, M) int64: members per merged token (they sum to
    N). Slots follow the order of the tokens that were kept (each merged
    token sits where the token that received its members sat).
    """

    index: torch.Tensor
    sizes: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """M, the number of merged tokens."""
        return self.sizes.shape[1]

    @property
    def num_merged(self) -> int:
        """N - M, the number of tokens merged away."""
        return self.index.shape[1] - self.sizes.shape[1]

    def flat_index(self) -> torch.Tensor:
        """(B·N,) row of each token's merged token in a (B·M, ...) flattening."""
        batch, m = self.sizes.shape
        offsets = torch.arange(batch, device=self.index.device)[:, None] * m
        return (self.index + offsets).flatten()


def merge_plan(
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    ratio: float,
    r: int,
    protect: list[int] | tuple[int, ...],
    sizes: torch.Tensor | None = None,
    protected: torch.Tensor | None = None,
    exact: bool = False,
    padding_first: bool = False,
) -> MergePlan:
    """Bipartite soft matching on the keys (see the module docstring).

    k (batch, kv_heads, N, head_dim); ``attn_mask`` None or broadcastable to
    (batch, heads, q_len, N); ``r >= 0`` tokens to merge away, or ``r == -1``
    for ``round(ratio · N)``. Returns the plan; ``plan.num_tokens`` is the
    number of keys attention runs on.

    For tokens that are already merged (``tokens`` mode): ``sizes`` (B, N)
    gives each token's weight (members it stands for; the plan's sizes are
    then sums of these), ``protected`` (B, N) bool marks more tokens that
    never merge. ``exact=True`` merges exactly the requested count, which the
    caller has clipped to :func:`exact_count`: when a bipartite round finds no
    eligible pair (the alternating split can strand the last tokens of a
    kind), rounds that pair any two eligible tokens merge one pair at a time.
    ``padding_first=True`` ranks every padding pair above every real pair
    (by similarity within each group): merging padding changes no output at
    a real token, so it is spent first.
    """
    batch, _, n, _ = k.shape
    dev = k.device
    index = torch.arange(n, device=dev).expand(batch, n).contiguous()
    sizes = torch.ones(batch, n, dtype=torch.int64, device=dev) if sizes is None else sizes.to(torch.int64)
    want = merge_count(n, ratio, r)
    if want == 0 or n < 2:
        return MergePlan(index, sizes)

    metric = k.float().mean(1)  # (B, N, D): what ToMe matches on
    prot_pos = sorted({p for p in protect if p < n})
    prot = torch.zeros(batch, n, dtype=torch.bool, device=dev) if protected is None else protected.clone()
    if prot_pos:
        prot[:, prot_pos] = True
    pad = key_padding(attn_mask, batch, n)
    # Tokens of another kind (padding vs real) are never matched; without a mask all are real.
    kind = None if pad is None else pad.to(dev)
    neg_inf = float("-inf")
    rows = torch.arange(batch, device=dev)[:, None]

    merged = 0
    while merged < want and metric.shape[1] >= 2:
        t = metric.shape[1]
        x = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = x[:, ::2] @ x[:, 1::2].transpose(1, 2)  # (B, |A|, |B|) cosine
        # Broadcast masks: no (B, |A|, |B|) bool tensor is built for protection.
        scores.masked_fill_(prot[:, ::2, None], neg_inf).masked_fill_(prot[:, None, 1::2], neg_inf)
        if kind is not None:
            scores.masked_fill_(kind[:, ::2, None] != kind[:, None, 1::2], neg_inf)
            if padding_first:
                scores.add_(kind[:, ::2, None].to(scores.dtype), alpha=4.0)  # cosines lie in [-1, 1]
        best, dst = scores.max(dim=-1)  # (B, |A|)
        eligible = int((best > neg_inf).sum(-1).min())  # host sync: a shape follows from it
        step = min(want - merged, eligible)
        if step == 0:
            if not exact:
                break
            src, target = _best_pair(x, prot, kind)
        else:
            # Stable, so equal similarities (e.g. identical padding keys) merge the earlier A token first.
            src_a = best.sort(dim=-1, descending=True, stable=True).indices[:, :step]
            src = 2 * src_a  # places in the current token list
            target = 2 * dst.gather(1, src_a) + 1
        step = src.shape[1]
        kept = torch.ones(batch, t, dtype=torch.bool, device=dev).scatter_(1, src, False)
        slot = kept.cumsum(1) - 1  # slot of each kept token among the t - step new ones
        target = torch.arange(t, device=dev).expand(batch, t).scatter(1, src, target)
        slot_map = slot.gather(1, target)  # (B, t): new slot of each current token
        index = slot_map.gather(1, index)
        new_t = t - step
        # Sums over members as index_add_ on flattened rows (faster than scatter_add_ with an expanded index).
        flat = (slot_map + rows * new_t).flatten()
        new_sizes = sizes.new_zeros(batch * new_t).index_add_(0, flat, sizes.flatten()).view(batch, new_t)
        merged += step
        if merged < want:
            # Size-weighted mean of the members' metrics (= the mean over the original tokens).
            d = metric.shape[-1]
            sums = metric.new_zeros(batch * new_t, d).index_add_(0, flat, (metric * sizes[..., None]).view(-1, d))
            metric = sums.view(batch, new_t, d) / new_sizes[..., None].clamp_min(1)
            # A merged token's flags are its kept member's (sources merge only into their own kind).
            prot = prot[kept].view(batch, new_t)
            kind = None if kind is None else kind[kept].view(batch, new_t)
        sizes = new_sizes
    if exact and merged < want:
        raise ValueError(
            f"merge_plan: only {merged} of {want} tokens can merge (protected tokens and padding limit it); "
            "ask for fewer (see exact_count)"
        )
    return MergePlan(index, sizes)


def exact_count(num_tokens: int, ratio: float, r: int, protected: int) -> int:
    """The merge count ``tokens`` mode uses: the request, clipped so it can always be met.

    Every token except the ``protected`` ones and one per kind (padding,
    real) can merge, so ``N - protected - 2`` merges are always possible.
    """
    return max(0, min(merge_count(num_tokens, ratio, r), num_tokens - protected - 2))


def _best_pair(
    x: torch.Tensor, prot: torch.Tensor, kind: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One merge per batch element, (B, 1) source and target places: the most similar eligible pair.

    Used when the alternating split leaves no eligible pair; the caller
    guarantees one exists (see :func:`exact_count`).
    """
    t = x.shape[1]
    neg_inf = float("-inf")
    scores = x @ x.transpose(1, 2)
    scores.diagonal(dim1=1, dim2=2).fill_(neg_inf)
    scores.masked_fill_(prot[:, :, None], neg_inf).masked_fill_(prot[:, None, :], neg_inf)
    if kind is not None:
        scores.masked_fill_(kind[:, :, None] != kind[:, None, :], neg_inf)
    flat = scores.flatten(1).argmax(-1, keepdim=True)
    if bool((scores.flatten(1).gather(1, flat) == neg_inf).any()):
        raise ValueError(
            "merge_plan: no eligible pair of tokens is left to merge; ask for fewer merges (see exact_count)"
        )
    return flat // t, flat % t
