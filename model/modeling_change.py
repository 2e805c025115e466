"""UniRS change-extraction module M_c (spec section 2.2): UniRS's `AttentiveEncoder`, adapted from Chg2Cap.

f1, f2 (B, 729, C) for the before/after images -> (B, 729, C), which the VILA projector `single`
then maps to 196 LLM rows. Parameter names equal the released checkpoint keys `layers.change.*`
(`llava/model/multimodal_projector/model_encoder.py@476abda`, IntelliSensing/UniRS).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_unirs import UniRSConfig

__all__ = ["ChangeExtractionModule", "Chg2CapAttention", "Chg2CapTransformer", "ResidualBottleneck"]


class ResidualBottleneck(nn.Module):
    """Chg2Cap `resblock` (kept under the released name `LN`): ReLU(left(x) + x).

    left = 1x1 conv C->C/2, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv C/2->C, BN.
    """

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(channels, half, kernel_size=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.left(x) + x)


class Chg2CapAttention(nn.Module):
    """Chg2Cap `MultiHeadAtt`. V is computed with `to_k` (inherited quirk); `to_v` exists but is unused."""

    def __init__(self, dim_q: int, dim_kv: int, attention_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (attention_dim // heads) ** -0.5
        self.to_q = nn.Linear(dim_q, attention_dim, bias=False)
        self.to_k = nn.Linear(dim_kv, attention_dim, bias=False)
        self.to_v = nn.Linear(dim_kv, attention_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        project_out = not (heads == 1 and attention_dim == dim_kv)
        self.to_out = (
            nn.Sequential(nn.Linear(attention_dim, dim_q), nn.Dropout(dropout)) if project_out else nn.Identity()
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """x*: (B, L, dim) -> (B, L, dim_q)."""
        b, n, _ = x1.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x1)), split(self.to_k(x2)), split(self.to_k(x3))
        attn = self.dropout(torch.matmul(q, k.transpose(-1, -2)).mul(self.scale).softmax(dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class Chg2CapTransformer(nn.Module):
    """Post-norm transformer block of Chg2Cap (norm_first=False as instantiated by UniRS)."""

    def __init__(self, dim: int, heads: int, attention_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.att = Chg2CapAttention(dim, dim, attention_dim, heads, dropout)
        self.feedforward = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim), nn.Dropout(dropout)
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.att(x, x, x) + x)
        return self.norm2(self.feedforward(x) + x)


class ChangeExtractionModule(nn.Module):
    """Change-extraction module M_c (UniRS `AttentiveEncoder`, spec section 2.2).

    Parameter names match the released checkpoint keys `layers.change.*`.
    Input: f1, f2 (B, L = g*g, C) for the before/after images. Output: (B, L, C).
    """

    def __init__(self, config: UniRSConfig):
        super().__init__()
        c = config.mm_hidden_size
        self.grid = config.grid_size
        self.h_embedding = nn.Embedding(self.grid, c // 2)
        self.w_embedding = nn.Embedding(self.grid, c // 2)
        # Each HSA layer is [shared per-image block on C, block on the concatenated 2C]; the FFN
        # hidden width is C for both, as in the released constructor (hidden_dim = mm_hidden_size).
        self.selftrans = nn.ModuleList(
            nn.ModuleList(
                [
                    Chg2CapTransformer(c, config.cc_head, config.cc_attention_dim, c, config.cc_dropout),
                    Chg2CapTransformer(2 * c, config.cc_head, config.cc_attention_dim, c, config.cc_dropout),
                ]
            )
            for _ in range(config.cc_n_layers)
        )
        self.Conv1 = nn.Conv2d(2 * c, c, kernel_size=1)
        self.LN = ResidualBottleneck(c)
        self.cos = nn.CosineSimilarity(dim=1)
        self.reset_parameters(torch.Generator().manual_seed(config.change_module_init_seed))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform on every parameter with dim > 1 (embeddings, convs, linears), as released.

        LayerNorm/BatchNorm/bias keep their PyTorch defaults (BN running stats 0/1).
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                # PyTorch's default bias init, drawn from the local generator for reproducibility.
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p, generator=generator)

    def position_table(self) -> torch.Tensor:
        """(g*g, C) table; token n = r * g + c gets concat(h_embedding[c], w_embedding[r])."""
        idx = torch.arange(self.grid, device=self.h_embedding.weight.device)
        col = self.h_embedding(idx)  # (g, C/2) indexed by column
        row = self.w_embedding(idx)  # (g, C/2) indexed by row
        g = self.grid
        table = torch.cat([col.unsqueeze(0).expand(g, g, -1), row.unsqueeze(1).expand(g, g, -1)], dim=-1)
        return table.reshape(g * g, -1)

    def forward(
        self, f1: torch.Tensor, f2: torch.Tensor, return_cosine: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """f1, f2: (B, L, C) -> (B, L, C); with `return_cosine` also the cosine map (B, g, g)."""
        b, length, c = f1.shape
        g = self.grid
        if length != g * g:
            raise ValueError(f"Change module expects {g * g} tokens per image, got {length}")
        pos = self.position_table().to(f1.dtype)
        x1, x2 = f1 + pos, f2 + pos
        sa1, sa2 = x1, x2
        for per_image, joint in self.selftrans:
            sa1 = per_image(sa1) + sa1
            sa2 = per_image(sa2) + sa2
            both = joint(torch.cat([sa1, sa2], dim=-1))
            sa1 = both[..., :c] + x1
            sa2 = both[..., c:] + x2
        m1 = sa1.reshape(b, g, g, c).permute(0, 3, 1, 2)
        m2 = sa2.reshape(b, g, g, c).permute(0, 3, 1, 2)
        cosine = self.cos(m1, m2)  # (B, g, g)
        # The similarity is broadcast onto all 2C channels of the concatenation.
        x = torch.cat([m1, m2], dim=1) + cosine.unsqueeze(1)
        x = self.LN(self.Conv1(x))
        out = x.reshape(b, c, g * g).permute(0, 2, 1)
        return (out, cosine) if return_cosine else out
