"""Hugging Face transformers checkpoints: the layout pieces the families share, for their checkpoint filters.

transformers stores a ViT-style encoder layer BERT's way: ``attention.attention.{query,key,value}``, then
``attention.output.dense``, ``intermediate.dense`` (MLP in), ``output.dense`` (MLP out), ``layernorm_before`` and
``layernorm_after`` (the layout of the checkpoints on the Hub and of transformers 4); transformers 5 names them
``attention.{q,k,v,o}_proj`` and ``mlp.fc1/fc2`` in some models (ViT). timm and vitkit fuse query/key/value into
one ``attn.qkv`` and name the rest ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``, ``norm2``. Both layouts
convert. A family's ``checkpoint_filter`` recognises the transformers
layout by its keys and converts it with :func:`rename` and :func:`transformer_layers`; vitkit never imports
transformers (parity is tested on fixtures made with it, ``benchmarks/segmentation/hf_fixtures.py``).
"""

from __future__ import annotations

import re

import torch

LAYER_PARTS = [
    (r"attention\.output\.dense\.", "attn.proj."),
    (r"attention\.o_proj\.", "attn.proj."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"output\.dense\.", "mlp.fc2."),
    (r"layernorm_before\.", "norm1."),
    (r"layernorm_after\.", "norm2."),
]


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` without it; keys elsewhere unchanged."""
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def rename(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply regex ``(pattern, replacement)`` rules in order to every key (each rule to the result of the last)."""
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def transformer_layers(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    r"""BERT-style layers ``<src>.<i>.*`` -> timm blocks ``<dst>.<i>.*``, query/key/value concatenated into
    ``attn.qkv`` (rows in q, k, v order, as timm's). ``src`` is a regex; ``dst`` may refer to its groups
    (``src=r"encoder\.layer\.(\d+)\.transformer\.layer", dst=r"stages.\1.1.transformer"``)."""
    pat = re.compile(rf"^{src}\.(\d+)\.(.*)$")
    n = pat.groups
    out, qkv = {}, {}
    for k, v in sd.items():
        m = pat.match(k)
        if m is None:
            out[k] = v
            continue
        head, rest = f"{m.expand(dst)}.{m.group(n - 1)}", m.group(n)
        a = re.match(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$", rest)
        if a:
            qkv.setdefault((head, a.group(3)), {})[a.group(1) or a.group(2)] = v
            continue
        for pattern, repl in LAYER_PARTS:
            rest = re.sub("^" + pattern, repl, rest)
        out[f"{head}.{rest}"] = v
    for (head, kind), parts in qkv.items():
        q, k, v = (parts.get(n) if n in parts else parts[n[0]] for n in ("query", "key", "value"))
        out[f"{head}.attn.qkv.{kind}"] = torch.cat([q, k, v], 0)
    return out
