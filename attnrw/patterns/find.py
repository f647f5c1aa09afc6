"""One pass over a graph: every candidate anchor, matched or skipped with its reason."""

from __future__ import annotations

import dataclasses

from torch.fx import GraphModule

from attnrw.patterns.context import MatchContext
from attnrw.patterns.eager import match_softmax
from attnrw.patterns.graph import SOFTMAX, aten, module_path
from attnrw.patterns.match import Match, NoMatch
from attnrw.patterns.sdpa import SDPA_OPS, match_sdpa
from attnrw.patterns.site import Skipped

#: Fused fast paths that hide attention inside one op. The compile path
#: decomposes them before matching; if one is still here it is reported.
FUSED_LAYERS = {
    aten._native_multi_head_attention.default: "nn.MultiheadAttention fast path",
    aten._transformer_encoder_layer_fwd.default: "nn.TransformerEncoderLayer fast path",
}


def find_sites(gm: GraphModule, ctx: MatchContext | None = None) -> tuple[list[Match], list[Skipped]]:
    """Match every softmax and SDPA node of ``gm`` (read-only); return matches and skips in graph order."""
    ctx = ctx or MatchContext(gm)
    matches: list[Match] = []
    skipped: list[Skipped] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SOFTMAX:
            matcher = match_softmax
        elif node.target in SDPA_OPS:
            matcher = match_sdpa
        elif node.target in FUSED_LAYERS:
            skipped.append(Skipped(module_path(node), node.name, f"{FUSED_LAYERS[node.target]} left fused"))
            continue
        else:
            continue
        try:
            m = matcher(node, ctx)
        except NoMatch as e:
            skipped.append(Skipped(module_path(node), node.name, str(e)))
            continue
        m.site = dataclasses.replace(m.site, index=len(matches))
        matches.append(m)
    return matches, skipped
