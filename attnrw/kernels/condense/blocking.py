"""Blocking of the PyTorch path of ``attnrw::condensed_attention``, and the masks it caches.

Two parts per query (see :mod:`attnrw.kernels.condense.reference`): the
*window*, queries folded in blocks of ``WINDOW_FOLD`` rows, each reading an
overlapping run of the keys; and the *condensed* part, queries in blocks of
``block_size`` reading the sinks and then one summary per group. What each
row sees in either part depends only on ints (:class:`Layout`), so the
masks are cached per layout and device (callers must not modify them): a
model's layers share them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnrw.kernels.common.shapes import additive, cdiv
from attnrw.kernels.condense.layout import Geometry, query_bounds


#: Query rows per block of the window part (independent of ``block_size``, which only
#: decides the pooling blocks). Measured on the window's SDPA call alone at S=8192, 8 heads,
#: recent=512, group=16 (CPU time, one thread): 16 rows +14%, 32 best, 64 +6%, 128 +19%.
WINDOW_FOLD = 32


@dataclass(frozen=True)
class Layout:
    """The ints one call's blocking depends on (hashable: the cached masks key on it)."""

    geo: Geometry
    block_size: int
    fold: int

    @property
    def seq_len(self) -> int:
        return self.geo.seq_len

    @property
    def num_blocks(self) -> int:
        """Query blocks of ``block_size`` (the pooling blocks, and the rows of the condensed part)."""
        return cdiv(self.seq_len, self.block_size)

    @property
    def num_windows(self) -> int:
        return cdiv(self.seq_len, self.fold)

    @property
    def full(self) -> bool:
        """The window of every block covers the sequence: read it whole, with no padded copy."""
        before, after = self.geo.reach
        return self.fold + before + after >= self.seq_len

    @property
    def before(self) -> int:
        return 0 if self.full else self.geo.reach[0]

    @property
    def window_len(self) -> int:
        before, after = self.geo.reach
        return self.seq_len if self.full else self.fold + before + after

    @property
    def num_slots(self) -> int:
        """Slots of the condensed part: the sinks, then one per group."""
        return self.geo.num_sinks + self.geo.num_groups


def make_layout(q: torch.Tensor, recent: int, group: int, sinks: int, is_causal: bool, block_size: int) -> Layout:
    geo = Geometry(q.shape[-2], recent, group, sinks, bool(is_causal))
    return Layout(geo, block_size, WINDOW_FOLD)


@functools.lru_cache(maxsize=16)
def window_layout(lay: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key position of every window slot (nw, L) and which (query, slot) pairs attend (nw, fold, L).

    Slots outside the sequence get position ``seq_len``. Cached (callers must not modify the result).
    """
    seq, fold, nw, length = lay.seq_len, lay.fold, lay.num_windows, lay.window_len
    start = torch.zeros(nw, dtype=torch.long, device=device) if lay.full else torch.arange(nw, device=device) * fold - lay.before
    pos = start[:, None] + torch.arange(length, device=device)[None, :]
    xs, xe, _, _ = query_bounds(lay.geo, device)
    pad = nw * fold - seq
    # Padding rows get an empty interval (xs > xe).
    xs = F.pad(xs, (0, pad), value=seq).view(nw, fold, 1)
    xe = F.pad(xe, (0, pad), value=-1).view(nw, fold, 1)
    allowed = (pos[:, None, :] >= xs) & (pos[:, None, :] <= xe)
    return pos.masked_fill((pos < 0) | (pos >= seq), seq), allowed


@functools.lru_cache(maxsize=16)
def window_bias(lay: Layout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The window's allowed mask as additive 0 / -inf (nw, fold, L) in ``dtype``."""
    return additive(window_layout(lay, device)[1], dtype)


@functools.lru_cache(maxsize=16)
def condensed_allowed(lay: Layout, device: torch.device) -> torch.Tensor:
    """Which sinks and summaries each query row sees (nb·bs, sinks + ng) bool. Cached."""
    geo = lay.geo
    rows = lay.num_blocks * lay.block_size
    _, _, glo, ghi = query_bounds(geo, device)
    pad = rows - geo.seq_len
    i = torch.arange(rows, device=device)[:, None]
    real = i < geo.seq_len
    j = torch.arange(geo.num_sinks, device=device)[None, :]
    sink_ok = real & ((j <= i) if geo.is_causal else torch.ones_like(j, dtype=torch.bool))
    g = torch.arange(geo.num_groups, device=device)[None, :]
    glo = F.pad(glo, (0, pad))[:, None]
    ghi = F.pad(ghi, (0, pad))[:, None]
    group_ok = real & ((g < glo) | (g > ghi))
    return torch.cat([sink_ok, group_ok], dim=1)


@functools.lru_cache(maxsize=16)
def condensed_bias(lay: Layout, device: torch.device, dtype: torch.dtype, size_bias: bool) -> torch.Tensor:
    """:func:`condensed_allowed` as an additive mask (nb·bs, sinks + ng) in ``dtype``.

    With ``size_bias`` the summaries carry ``log(size)`` here already: without
    a user mask the size depends only on the geometry (the last group may be short).
    """
    bias = additive(condensed_allowed(lay, device), dtype)
    if size_bias and lay.geo.num_groups:
        geo = lay.geo
        sizes = (geo.seq_len - geo.sinks - torch.arange(geo.num_groups, device=device) * geo.group).clamp(max=geo.group)
        bias[:, geo.num_sinks :] += sizes.to(dtype).log()
    return bias


@functools.lru_cache(maxsize=16)
def rows_seeing(lay: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which query rows see some key of the window part (nw·fold,) and of the condensed part (nb·bs,), no user mask."""
    return window_layout(lay, device)[1].any(-1).flatten(), condensed_allowed(lay, device).any(-1)


@functools.lru_cache(maxsize=16)
def condensed_reach(lay: Layout) -> tuple[int, ...]:
    """Per query block, the length of the prefix of condensed slots its queries see (sinks, then groups)."""
    geo = lay.geo
    _, _, glo, ghi = query_bounds(geo, torch.device("cpu"))
    pad = lay.num_blocks * lay.block_size - geo.seq_len
    glo = F.pad(glo, (0, pad), value=0).view(lay.num_blocks, -1).amax(1)
    ghi = F.pad(ghi, (0, pad), value=geo.num_groups - 1).view(lay.num_blocks, -1).amin(1)
    # Visible groups are g < glo or g > ghi: the last one is ng - 1 if some query has ghi < ng - 1.
    groups = torch.where(ghi < geo.num_groups - 1, geo.num_groups, glo)
    return tuple(int(x) + geo.num_sinks for x in groups)


def has_condensed_part(lay: Layout) -> bool:
    """Whether any query sees a sink or a summary (else the window alone is the result)."""
    return max(condensed_reach(lay), default=0) > 0
