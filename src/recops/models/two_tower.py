"""The two-tower recommender over one shared text backbone.

Item tower: the backbone reads the item's text; a projection maps it to the
embedding space, and for warm items an ID embedding is added. Cold items (no
interactions in training) have text only, so they are recommendable the moment
they are in the catalog.

User tower: the user's recent history read as item-tower vectors (as HLLM
does), so each distinct item is encoded once per step rather than once per user.
Two shapes: the sequence tower (``sequence_blocks`` > 0), a small transformer over
the history (:mod:`recops.models.sequence_encoder`) whose state at the newest entry
is the user's vector; or the pooled tower, the history pooled and passed through a
residual MLP. The pooled tower's pooling is the mean plus a gated
attention read that is aware of order: each entry carries an embedding of its
position from the end (the newest is 0) and a learned recency logit, so the tower
can weigh the last items most where order matters (next-item data) and leave the
mean alone where it does not. The gate starts at zero: the plain mean (what
models exported before it load as).

Retrieval score: cosine of the normalised user and item vectors over a
temperature, plus an item-to-item residual: each history item adds a weight to
each of its top-k co-occurrence neighbours (sparse, EASE-like, k per item so it
scales with the catalog, not its square): the pair's cosine times a learned
scale, plus a learned per-pair correction, both starting at zero, summed over
the history and divided by the square root of its length. Click and like heads
read ``[u, v, u*v]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recops.api.recmodel import (
    DEFAULT_SEQUENCE_BLOCKS,
    DEFAULT_SEQUENCE_DROPOUT,
    DEFAULT_SEQUENCE_LENGTH,
    SEQUENCE,
    RecModelSpec,
)
from recops.kernels import head_features
from recops.models.backbone import TextEncoder
from recops.models.sequence_encoder import SequenceEncoder


@dataclass(frozen=True)
class TwoTowerConfig:
    """Shape of the non-backbone part of the model."""

    n_items: int
    embedding_dim: int = 128
    temperature: float = 0.07
    use_id_embeddings: bool = True
    # Fraction of warm items whose ID part is hidden each step, so text alone
    # learns to place items: that is what cold items get at serving time.
    id_dropout: float = 0.2
    # History positions (from the newest) with their own position embedding and recency logit;
    # older entries share the last one. 0: plain mean pooling.
    recency_positions: int = 50
    # Neighbours per item in the item-to-item residual; 0: none.
    neighbours: int = 0
    # The sequence tower's transformer blocks; 0: the pooled tower. Its heads, the newest entries it reads,
    # its dropout, and whether it reads order (causal, with positions) or the history as a set.
    sequence_blocks: int = 0
    sequence_heads: int = 1
    sequence_length: int = 50
    sequence_dropout: float = 0.5
    causal: bool = True


# History entries (users × positions) the sequence tower reads in one go when scoring.
_SEQUENCE_CELLS = 16384


def tower_config(spec: RecModelSpec, n_items: int) -> TwoTowerConfig:
    """The towers' shape for a spec (training and loading an export build it alike).

    The sequence tower reads order when the split holds out what comes next (``loo``, ``time``) and the
    history as a set under a random hold-out (``recbole``); it has no recency read or co-occurrence residual
    (the transformer reads order itself; the residual did not pay on Beauty, docs/architecture.md), unless
    the spec names them.
    """
    t = spec.training
    sequence = t.tower(spec.data.split) == SEQUENCE
    return TwoTowerConfig(
        n_items=n_items,
        embedding_dim=t.width(spec.data.split),
        temperature=t.temperature,
        use_id_embeddings=t.use_id_embeddings,
        recency_positions=0 if sequence else t.recency(),
        neighbours=(t.neighbours or 0) if sequence else t.residual_neighbours(),
        sequence_blocks=(t.sequence_blocks or DEFAULT_SEQUENCE_BLOCKS) if sequence else 0,
        sequence_heads=t.sequence_heads or 1,
        sequence_length=t.sequence_length or DEFAULT_SEQUENCE_LENGTH,
        sequence_dropout=DEFAULT_SEQUENCE_DROPOUT if t.sequence_dropout is None else t.sequence_dropout,
        causal=spec.data.split != "recbole",
    )


def _positions_from_end(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each entry's position from its user's newest entry (0), for entries listed user by user, oldest first."""
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
    return counts[rows] - 1 - rank


def _softmax_by_row(logits: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Softmax of ``logits`` (M) within each group of entries that share a row (``rows``: M)."""
    peak = logits.new_full((n_rows,), float("-inf")).scatter_reduce(0, rows, logits.detach(), "amax")
    exp = torch.exp(logits - peak[rows])
    total = logits.new_zeros(n_rows).index_add_(0, rows, exp)
    return exp / total[rows]


class Head(nn.Module):
    """A small MLP from ``[u, v, u*v]`` to one logit."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """One logit per row of ``[u, v, u*v]`` features (:func:`recops.kernels.head_features`)."""
        return self.net(features).squeeze(-1)


class TwoTowerModel(nn.Module):
    """Item and user towers, retrieval score and click/like heads."""

    def __init__(self, encoder: TextEncoder | None, text_dim: int, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        dim = config.embedding_dim
        self.text_projection = nn.Linear(text_dim, dim)
        self.id_embedding = nn.Embedding(config.n_items, dim)
        nn.init.normal_(self.id_embedding.weight, std=0.02)
        # What an item says about a user who has it in their history, beyond its item vector.
        # Zero at the start (and for items never trained on): history reads the item vector alone.
        self.history_embedding = nn.Embedding(config.n_items, dim)
        nn.init.zeros_(self.history_embedding.weight)
        if config.sequence_blocks:
            self.sequence = SequenceEncoder(dim, config.sequence_blocks, config.sequence_heads,
                                            config.sequence_length, config.sequence_dropout, config.causal)
        else:
            self.user_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        if config.recency_positions and not config.sequence_blocks:
            # Zero at the start: equal weights and no position signal, the plain mean.
            self.position_embedding = nn.Embedding(config.recency_positions, dim)
            nn.init.zeros_(self.position_embedding.weight)
            self.recency_logit = nn.Parameter(torch.zeros(config.recency_positions))
            self.attention = nn.Linear(dim, 1)
            nn.init.zeros_(self.attention.weight)
            nn.init.zeros_(self.attention.bias)
            self.recency_gate = nn.Parameter(torch.zeros(()))
        self.empty_history = nn.Parameter(torch.zeros(dim))
        # A per-item popularity prior on the retrieval logit; cold items get the warm items' mean.
        self.item_bias = nn.Parameter(torch.zeros(config.n_items))
        self.click_head = Head(dim)
        self.like_head = Head(dim)
        if config.neighbours:
            # Each item's neighbours (set from the training data by set_neighbours) and their learned weights.
            k = config.neighbours
            self.register_buffer("neighbour_index", torch.arange(config.n_items).unsqueeze(1).repeat(1, k))
            self.register_buffer("neighbour_real", torch.zeros(config.n_items, k, dtype=torch.bool))
            # The co-occurrence cosine of each pair (ItemCF's weights), scaled by one learned number, plus a
            # learned per-pair correction that starts at zero.
            self.register_buffer("neighbour_prior", torch.zeros(config.n_items, k))
            self.residual_scale = nn.Parameter(torch.zeros(()))
            self.neighbour_weight = nn.Parameter(torch.zeros(config.n_items, k))
        # Backbone outputs of every item, refreshed during training; buffers travel with state_dict.
        self.register_buffer("text_cache", torch.zeros(config.n_items, text_dim))
        self.register_buffer("warm", torch.ones(config.n_items, dtype=torch.bool))

    def item_vectors(
        self,
        fresh_items: torch.Tensor | None = None,
        fresh_text: torch.Tensor | None = None,
        id_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised vectors of every item.

        ``fresh_text`` (with gradients) replaces the cached backbone output of
        ``fresh_items``; ``id_keep`` masks the ID part per item (ID dropout).
        """
        text = self.text_cache
        if fresh_items is not None and fresh_text is not None:
            text = text.index_put((fresh_items,), fresh_text)
        vectors = self.text_projection(text)
        if self.config.use_id_embeddings:
            keep = self.warm if id_keep is None else self.warm & id_keep
            vectors = vectors + self.id_embedding.weight * keep.unsqueeze(-1).to(vectors.dtype)
        return F.normalize(vectors, dim=-1)

    def user_vectors(self, item_vectors: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised user vectors from padded history indices (``history``, ``mask``: B × L)."""
        # Only the valid entries are gathered: long padded histories cost what they hold.
        rows, columns = mask.nonzero(as_tuple=True)
        return self.user_vectors_of_entries(item_vectors, history[rows, columns], rows, mask.sum(dim=1))

    def user_vectors_of_entries(
        self, item_vectors: torch.Tensor, entries: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`user_vectors` from the valid history entries, already listed: their item indices and users'
        rows (``entries``, ``rows``: M, users in order, each user's entries oldest first) and each user's number
        of entries (``counts``: B). Serving lists them on the host, where that costs less than torch ops."""
        read = self._history_read(item_vectors, entries)
        if self.config.sequence_blocks:
            return self._sequence_user_vectors(read, rows, counts)
        n_users, lengths = counts.shape[0], counts
        counts = counts.to(item_vectors.dtype).unsqueeze(1)
        summed = item_vectors.new_zeros(n_users, item_vectors.shape[1]).index_add_(0, rows, read)
        pooled = summed / counts.clamp(min=1.0)
        if self.config.recency_positions and not self.config.sequence_blocks:
            # The attention read is added to the mean through a gate that starts at 0: the tower
            # starts as (and, where order says nothing, can stay) the plain mean.
            from_end = _positions_from_end(rows, lengths).clamp(max=self.config.recency_positions - 1)
            keyed = read + self.position_embedding(from_end)
            weights = _softmax_by_row(self.attention(keyed).squeeze(-1) + self.recency_logit[from_end], rows, n_users)
            attended = torch.zeros_like(pooled).index_add_(0, rows, keyed * weights.unsqueeze(-1).to(keyed.dtype))
            pooled = pooled + self.recency_gate * attended
        pooled = torch.where(counts > 0, pooled, self.empty_history.expand_as(pooled))
        return F.normalize(pooled + self.user_mlp(pooled), dim=-1)

    def _history_read(self, item_vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """What the user tower reads of history items (any shape of indices): the item vector plus what the
        item says of a user who has it (the history embedding)."""
        read = item_vectors[items]
        if self.config.use_id_embeddings:
            read = read + self.history_embedding(items)
        return read

    def _sequence_user_vectors(self, read: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The sequence tower's state at each user's newest entry (causal) or the mean of its states (set), from
        the listed entries (as :meth:`user_vectors_of_entries`), over the newest ``sequence_length``.

        Users go through the transformer in groups of similar length, each group left-padded to its longest:
        most histories are short, and padding all to the longest in a batch cost several times the work."""
        n_users = counts.shape[0]
        from_end = _positions_from_end(rows, counts)
        keep = from_end < self.config.sequence_length
        rows, from_end, read = rows[keep], from_end[keep], read[keep]
        lengths = counts.clamp(max=self.config.sequence_length)
        users = read.new_zeros(n_users, read.shape[1])
        order = torch.argsort(lengths, stable=True)
        group = max(1, _SEQUENCE_CELLS // self.config.sequence_length)
        slot = torch.empty_like(order)
        for start in range(0, n_users, group):
            members = order[start : start + group]
            width = max(1, int(lengths[members].max()))
            slot[members] = torch.arange(len(members), device=order.device)
            mine = (torch.zeros(n_users, dtype=torch.bool, device=rows.device)
                    .index_fill_(0, members, True))[rows]
            padded = read.new_zeros(len(members), width, read.shape[1])
            mask = torch.zeros(len(members), width, dtype=torch.bool, device=read.device)
            cells = (slot[rows[mine]], width - 1 - from_end[mine])
            padded[cells] = read[mine]
            mask[cells] = True
            states = self.sequence(padded, mask)
            if self.config.causal:
                user = states[:, -1]  # the newest entry's state has read the whole history
            else:  # a set has no newest entry: the mean of the states, the same in any order
                user = states.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(states.dtype)
            users[members] = user.to(users.dtype)
        users = torch.where((counts > 0).unsqueeze(1), users, self.empty_history.expand_as(users))
        return F.normalize(users, dim=-1)

    def sequence_states(self, item_vectors: torch.Tensor, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised user vectors after every position of left-padded sequences (``sequences``, ``mask``:
        B × L, L at most ``sequence_length``): B × L × dim, what the sequence objective trains on."""
        states = self.sequence(self._history_read(item_vectors, sequences), mask)
        return F.normalize(states, dim=-1)

    def set_neighbours(self, index: torch.Tensor, real: torch.Tensor, prior: torch.Tensor) -> None:
        """Each item's residual neighbours (N × k indices), which of them are real (N × k, padding False)
        and their co-occurrence similarity (N × k)."""
        self.neighbour_index.copy_(index)
        self.neighbour_real.copy_(real)
        self.neighbour_prior.copy_(prior * real)

    def history_scores(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """B × N item-to-item residual of padded histories (``history``, ``mask``: B × L); None without one."""
        rows, columns = mask.nonzero(as_tuple=True)
        return self.history_scores_of_entries(history[rows, columns], rows, mask.sum(dim=1))

    def history_scores_of_entries(
        self, entries: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor | None:
        """:meth:`history_scores` from the listed valid entries and each user's count (as
        :meth:`user_vectors_of_entries`)."""
        if not self.config.neighbours:
            return None
        n_items, n_users = self.config.n_items, counts.shape[0]
        weights = self.neighbour_weight[entries] + self.residual_scale * self.neighbour_prior[entries]
        # Over the square root of the history's length: a sum over hundreds of items would drown the
        # towers' score for heavy users, a mean would wash it out (ML-100K: R@10 0.2919 against 0.2791, 0.2840).
        roots = counts.to(weights.dtype).clamp(min=1.0).sqrt()
        weights = weights * (self.neighbour_real[entries] / roots[rows].unsqueeze(1))
        cells = (rows.unsqueeze(1) * n_items + self.neighbour_index[entries]).reshape(-1)
        return weights.new_zeros(n_users * n_items).index_add_(0, cells, weights.reshape(-1)).view(n_users, n_items)

    def item_biases(self) -> torch.Tensor:
        """Retrieval bias of every item: learned for warm items, their mean for cold ones."""
        warm_mean = self.item_bias[self.warm].mean() if self.warm.any() else self.item_bias.new_zeros(())
        return torch.where(self.warm, self.item_bias, warm_mean)

    def retrieval_logits(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        item_idx: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        excluded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B × N logits of users against item vectors (``item_idx``: their indices; default all items);
        ``residual``: the users' B × (all items) :meth:`history_scores`; ``excluded`` (N, with all items): items
        pushed out of reach (-1e4), as the training softmax leaves cold items out."""
        biases = self.item_biases()
        biases = biases if item_idx is None else biases[item_idx]
        if excluded is not None:
            biases = biases.masked_fill(excluded, -1e4)
        # One fused multiply-add, the temperature applied to the B users rather than the B × N logits: with
        # every position of a batch of sequences scored against the catalog, each B × N pass was a tenth of a
        # training step.
        logits = torch.addmm(biases.to(users.dtype), users / self.config.temperature, items.T)
        if residual is not None:
            logits = logits + (residual if item_idx is None else residual[:, item_idx])
        return logits

    def head_logits(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Click and like logits of aligned (user, item) vector pairs."""
        return self.heads(head_features(users, items))

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Click and like logits of ``[u, v, u*v]`` feature rows, assembled once for both heads."""
        return self.click_head(features), self.like_head(features)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone weights: LoRA, projection, IDs, user MLP, heads, caches."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {
            name: tensor
            for name, tensor in self.state_dict().items()
            if not name.startswith("encoder.") or name in trainable
        }
