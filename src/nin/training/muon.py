"""``--optimizer muon``: Muon for the convolution filters, SGD for batch norm's and the biases' parameters.

Muon (Keller Jordan; the optimizer of airbench94_muon) replaces a filter bank's momentum by the nearest
semi-orthogonal matrix, computed by five Newton-Schulz iterations of an odd quintic, so that every direction
of the update moves at the same rate.  As in airbench, each bank is kept at a fixed norm (sqrt of its output
channels) before the step: batch norm follows every convolution here, so the filters' scale carries nothing
and the fixed norm stands in for weight decay.  torch.optim.Muon takes 2-D parameters only; a convolution's
``out x (in * k * k)`` view is the same matrix, so this optimizer works on that view.
"""
from __future__ import annotations

import torch

# The quintic's coefficients (a, b, c), chosen to raise small singular values fast rather than to converge
# exactly: the result's singular values land in about [0.7, 1.2] (Muon's, and torch.optim.Muon's, defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """The 2-D matrix ``g`` with its singular values pushed towards 1 (U S' V^T for g = U S V^T), in float32."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    wide = x.size(0) <= x.size(1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # the Frobenius norm bounds the largest singular value: all start in [0, 1]
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class ConvMuon(torch.optim.Optimizer):
    """Muon for the groups marked ``muon: True`` (parameters of 2 or more dimensions: conv filters), SGD with
    momentum (Nesterov if asked) for the others, torch.optim.SGD's update without weight decay (make_optimizer
    gives that group only biases and batch norm, which take none; the filters' fixed norm stands in for it).

    ``lr_ratio`` in a group multiplies the learning rate the schedule sets (``train_step`` sets every group's
    ``lr``): the Muon group's peak is ``--muon-lr`` while the others follow ``--lr``."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, muon=False, lr_ratio=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon's group takes matrices and filter banks only (2 or more dimensions)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if momentum:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(g)
                    buf = state["momentum_buffer"]
                    g = g.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))  # the bank's norm fixed at sqrt(out)
                    g = orthogonalize(g.reshape(len(g), -1)).view_as(p).to(p.dtype)
                p.add_(g, alpha=-lr)
        return loss
