"""Parameter and multiply-accumulate counts.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv, bmm, ...) and halved,
matching the papers' "FLOPs" convention (ARCHITECTURES.md §0). Attention runs on the eager path while
counting, because the counter sees no FLOPs in CPU ``scaled_dot_product_attention``; the eager path does
the same two matmuls explicitly. Norms, activations and softmax are not counted, as in the papers.
A detector is counted up to its raw head (``forward_raw``: the network; decoding and NMS are no MACs).
The count runs on the meta device by default (the module's parameters and buffers are swapped for meta
tensors through ``torch.func.functional_call``, nothing is copied), so even ViT-H costs no memory or time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.export import exportable
from vitkit.layers.attention import use_fused_attn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: tuple[int, ...] | None = None, batch: int = 1, meta: bool = True) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (C, H, W); default: the model's data config."""
    if input_size is None:
        input_size = tuple(model.pretrained_cfg["input_size"])
    model = exportable(model)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if meta:
        tensors = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    device = "meta" if meta else next(iter(tensors.values())).device
    x = torch.zeros((batch, *input_size), device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), use_fused_attn(False), counter:
            torch.func.functional_call(model, tensors, (x,))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
