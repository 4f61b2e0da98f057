"""Gated mixture of experts over tokens (docs/method.md, Model; after Shazeer et al. 2017, "Outrageously large neural
nets").

Each token picks its top-k experts by router logit; its gates are the softmax over those k logits (so they sum to 1
over exactly k experts) and the output is ``x + Σ_e gate_e · expert_e(x)``. The balance statistic is the importance of
each expert (the sum of its gates over the tokens); the balance loss is its squared coefficient of variation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_ad.losses import moe_balance_loss


class MoEOutput(NamedTuple):
    output: Tensor  # (B, L, D) = x + moe(x)
    gates: Tensor  # (B, L, E), k non-zero entries per token summing to 1
    importance: Tensor  # (E,) sum of each expert's gates over the tokens
    load: Tensor  # (E,) fraction of token assignments routed to each expert
    balance_loss: Tensor  # () squared coefficient of variation of the importance


class GatedMoE(nn.Module):
    """Top-k gated mixture of MLP experts with a residual connection.

    Training (eager) dispatches each expert only its routed tokens; under ``torch.export`` / ONNX tracing every
    expert runs on every token and is weighted by the (mostly zero) gates, which gives the same output with static
    shapes.

    Args:
        dim: token width D.
        num_experts: number of experts E.
        top_k: experts per token k.
        expert_ratio: expert hidden width as a multiple of D (expert = Linear(D, rD) -> GELU -> Linear(rD, D)).
    """

    def __init__(self, dim: int, num_experts: int = 5, top_k: int = 2, expert_ratio: float = 4.0) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        hidden = int(dim * expert_ratio)
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts)
        # Expert weights stacked per expert: (E, D, H) and (E, H, D).
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def route(self, x: Tensor) -> Tensor:
        """Gates (N, E) of tokens (N, D): softmax over each token's top-k router logits, 0 elsewhere."""
        logits = self.router(x).float()  # (N, E), fp32 routing under autocast
        top_logits, top_index = logits.topk(self.top_k, dim=-1)  # (N, k)
        return torch.zeros_like(logits).scatter(-1, top_index, top_logits.softmax(dim=-1))

    def _mix_sparse(self, x: Tensor, gates: Tensor) -> Tensor:
        # Tokens sorted by expert, one matmul pair per expert on its own rows. The stacked weights are unbound once:
        # indexing them per expert (w1[e]) would make autograd zero-fill and add a full (E, D, H) gradient per expert.
        token, expert = gates.nonzero(as_tuple=True)  # (N k,) routed (token, expert) pairs
        order = expert.argsort(stable=True)
        token, expert = token[order], expert[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()  # tokens per expert (one host sync)
        weights = zip(self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0), strict=True)
        routed = x.index_select(0, token).split(counts)  # per expert (count_e, D), in expert order
        outputs = [
            F.gelu(rows @ w1 + b1) @ w2 + b2
            for rows, count, (w1, b1, w2, b2) in zip(routed, counts, weights, strict=True)
            if count
        ]
        if not outputs:  # no tokens
            return torch.zeros_like(x)
        out = torch.cat(outputs) * gates[token, expert][:, None]  # (N k, D) gated expert outputs
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))  # (N, D)

    def _mix_dense(self, x: Tensor, gates: Tensor) -> Tensor:
        hidden = F.gelu(torch.einsum("nd,edh->enh", x, self.w1) + self.b1[:, None])  # (E, N, H)
        out = torch.einsum("enh,ehd->end", hidden, self.w2) + self.b2[:, None]  # (E, N, D)
        return torch.einsum("end,ne->nd", out, gates.to(out.dtype)).to(x.dtype)

    def forward(self, x: Tensor, dense: bool | None = None) -> MoEOutput:
        """Mix the experts into the tokens.

        Args:
            x: (B, L, D) tokens.
            dense: run every expert on every token (static shapes); default: only while exporting or tracing.
        """
        b, length, dim = x.shape
        flat = x.reshape(b * length, dim)  # (N, D)
        gates = self.route(flat)  # (N, E)
        if dense is None:
            dense = torch.compiler.is_exporting() or torch.jit.is_tracing()
        mixed = self._mix_dense(flat, gates) if dense else self._mix_sparse(flat, gates)
        importance = gates.sum(dim=0)  # (E,)
        load = (gates > 0).to(x.dtype).mean(dim=0) / self.top_k  # (E,), sums to 1
        return MoEOutput(
            output=x + mixed.reshape(b, length, dim),
            gates=gates.reshape(b, length, self.num_experts),
            importance=importance,
            load=load,
            balance_loss=moe_balance_loss(importance),
        )
