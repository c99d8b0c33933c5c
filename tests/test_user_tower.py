"""The user tower's order-aware pooling and the next-item training samples that teach it."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from recops.api.recmodel import RecModelSpec
from recops.data.features import history_columns, history_matrix
from recops.data.interactions import ITEM_IDX, TIMESTAMP, USER_IDX
from recops.data.prepare import prepare
from recops.models.two_tower import TwoTowerConfig, TwoTowerModel
from recops.training.evaluation import evaluate
from recops.training.trainer import ModelScorer, train


def _model(recency: int, seed: int = 0) -> TwoTowerModel:
    torch.manual_seed(seed)
    return TwoTowerModel(None, 16, TwoTowerConfig(n_items=30, embedding_dim=8, recency_positions=recency))


def _histories(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 30, (5, 9), generator=generator)
    mask = torch.rand(5, 9, generator=generator) > 0.3
    mask[3] = False  # a user with no history
    return items, mask


def test_the_order_aware_tower_starts_as_the_mean_so_models_exported_before_it_load_unchanged():
    mean, aware = _model(0), _model(50)
    # A model exported with mean pooling has none of the new weights: loading it leaves them at zero.
    missing = aware.load_state_dict(mean.state_dict(), strict=False).missing_keys
    assert set(missing) == {"position_embedding.weight", "recency_logit", "attention.weight", "attention.bias",
                            "recency_gate"}
    items, mask = _histories()
    with torch.no_grad():
        vectors = mean.item_vectors()
        assert torch.allclose(mean.user_vectors(vectors, items, mask), aware.user_vectors(vectors, items, mask),
                              atol=1e-6)


def test_a_learned_recency_weight_makes_the_newest_items_count_most():
    model = _model(4)
    with torch.no_grad():
        model.recency_logit.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))  # the newest entry dominates the read
        model.recency_gate.fill_(50.0)  # and the read dominates the mean
        vectors = model.item_vectors()
        items = torch.tensor([[3, 7, 11], [11, 7, 3]])  # the same items, newest last
        mask = torch.ones_like(items, dtype=torch.bool)
        users = model.user_vectors(vectors, items, mask)
        alone = model.user_vectors(vectors, items[:, -1:], mask[:, -1:])
    assert not torch.allclose(users[0], users[1], atol=1e-3)  # order now matters
    assert torch.nn.functional.cosine_similarity(users, alone).min() > 0.99


def test_history_columns_place_each_interaction_where_history_matrix_puts_it():
    frame = pl.DataFrame({
        USER_IDX: [0, 1, 0, 0, 1, 2], ITEM_IDX: [5, 6, 7, 8, 9, 4],
        TIMESTAMP: [30, 10, 10, 20, 20, 5],
    })
    histories = history_matrix(frame, 3, 2)
    columns = history_columns(frame, 2)
    # User 0: items 7 (t=10), 8 (t=20), 5 (t=30); only the newest two fit in two columns.
    assert columns.tolist() == [1, 0, -1, 0, 1, 1]
    for row, column in enumerate(columns):
        if column >= 0:
            assert histories.items[frame[USER_IDX][row], column] == frame[ITEM_IDX][row]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Shoppers who view random items, each followed by its fixed successor: x1, s(x1), x2, s(x2), x3,
    s(x3), x4, s(x4), s(s(x4)).

    Leave-one-out validates on s(x4) and tests on s(s(x4)), each read from everything before it.
    In a bag every history item is as related to the target as the others (successors and
    predecessors alike), so only a tower that knows which item is newest can pick the next one.
    """
    folder = tmp_path_factory.mktemp("chains")
    rng = np.random.default_rng(3)
    n_items, n_users, pairs = 60, 600, 4
    successor = rng.permutation(n_items)
    rows = []
    for user in range(n_users):
        views = [item for x in rng.choice(n_items, pairs, replace=False) for item in (int(x), int(successor[x]))]
        views.append(int(successor[views[-1]]))
        for step, item in enumerate(views):
            rows.append({"user_id": f"u{user}", "item_id": f"i{item}", "event": "click",
                         "timestamp": f"2026-01-01T00:{step:02d}:00Z"})
    (folder / "events.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "items.jsonl").write_text("\n".join(json.dumps({"item_id": f"i{i}", "title": f"item {i}"})
                                                  for i in range(n_items)))
    return folder


def _chain_spec(folder, **training) -> RecModelSpec:
    return RecModelSpec.model_validate({
        "data": {"source": "events", "events": str(folder / "events.jsonl"), "items": str(folder / "items.jsonl"),
                 "split": "loo", "historyLength": 16},
        "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 8},
        "lora": {"enabled": False},
        "training": {"epochs": 12, "batchSize": 256, "embeddingDim": 32, "textItemsPerStep": 0,
                     "historyDropout": 0.0, "temperature": 0.1, **training},
    })


@pytest.mark.slow
def test_next_item_samples_teach_the_tower_what_comes_next(chains, tmp_path):
    bag = _chain_spec(chains, userTower="pooled", nextItemFraction=0.0, recencyPositions=0)
    data = prepare(bag.data)
    recall = {}
    for name, spec in (("bag", bag), ("next", _chain_spec(chains, userTower="pooled", nextItemFraction=1.0)),
                       ("sequence", _chain_spec(chains, sequenceDropout=0.1))):
        result = train(spec, data, tmp_path / name)
        scorer = ModelScorer(result.model, result.histories)
        recall[name] = evaluate(scorer, data, ks=(5,), with_auc=False)["recall@5"]
    # The chain makes the next item certain; the mean of the walk only says "somewhere near".
    assert recall["next"] > 0.8 and recall["sequence"] > 0.8, recall
    assert min(recall["next"], recall["sequence"]) > recall["bag"] + 0.2, recall


def _sequence_model(causal: bool, length: int = 6) -> TwoTowerModel:
    torch.manual_seed(0)
    config = TwoTowerConfig(n_items=30, embedding_dim=8, recency_positions=0, sequence_blocks=2,
                            sequence_length=length, sequence_dropout=0.0, causal=causal)
    return TwoTowerModel(None, 16, config).eval()


def test_the_causal_sequence_tower_reads_only_what_came_before_each_position():
    model = _sequence_model(causal=True)
    items = torch.tensor([[0, 0, 4, 9, 2, 7], [0, 5, 4, 9, 2, 3]])
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    with torch.no_grad():
        vectors = model.item_vectors()
        states = model.sequence_states(vectors, items, mask)
        changed = model.sequence_states(vectors, torch.tensor([[0, 0, 4, 9, 2, 8], [0, 5, 4, 9, 2, 3]]), mask)
        # A user's vector is the state at their newest entry, however the history is padded (serving pads to
        # the feature schema's length, longer than the tower reads).
        wide = torch.cat([torch.zeros(2, 10, dtype=torch.long), items], dim=1)
        wide_mask = torch.cat([torch.zeros(2, 10, dtype=torch.bool), mask], dim=1)
        users = model.user_vectors(vectors, wide, wide_mask)
    assert torch.allclose(states[:, :-1], changed[:, :-1], atol=1e-6)  # the newest item changes no earlier state
    assert not torch.allclose(states[0, -1], changed[0, -1], atol=1e-3)
    assert torch.allclose(users, states[:, -1], atol=1e-5)
    assert not states[0, 0].any()  # padding has no state
    # Only the newest sequence_length entries are read: older ones change nothing.
    longer = torch.tensor([[11, 0, 5, 4, 9, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model.user_vectors(vectors, longer, torch.ones_like(longer, dtype=torch.bool)),
                              users[1:], atol=1e-5)


def test_the_set_sequence_tower_ignores_the_order_of_the_history():
    model = _sequence_model(causal=False)
    items = torch.tensor([[3, 8, 1, 6], [6, 1, 8, 3]])
    mask = torch.ones_like(items, dtype=torch.bool)
    with torch.no_grad():
        users = model.user_vectors(model.item_vectors(), items, mask)
        empty = model.user_vectors(model.item_vectors(), items, torch.zeros_like(mask))
    assert torch.allclose(users[0], users[1], atol=1e-5)
    assert torch.isfinite(empty).all()  # no history: the learned empty-history vector


def test_sequences_list_each_entrys_row_where_history_matrix_puts_it():
    from recops.data.features import sequence_matrix

    frame = pl.DataFrame({USER_IDX: [0, 1, 0, 0, 1, 2], ITEM_IDX: [5, 6, 7, 8, 9, 4],
                          TIMESTAMP: [30, 10, 10, 20, 20, 5]})
    sequences = sequence_matrix(frame, 3, 3)
    assert sequences.items.tolist() == [[7, 8, 5], [0, 6, 9], [0, 0, 4]]
    assert sequences.rows.tolist() == [[2, 3, 0], [-1, 1, 4], [-1, -1, 5]]
    assert sequences.lengths.tolist() == [3, 2, 1] and sequences.trainable().tolist() == [0, 1]


def test_the_item_to_item_residual_adds_each_history_items_neighbour_weights_over_root_length():
    torch.manual_seed(0)
    model = TwoTowerModel(None, 16, TwoTowerConfig(n_items=6, embedding_dim=8, neighbours=2))
    index = torch.tensor([[1, 2], [0, 0], [3, 2], [2, 2], [5, 5], [4, 4]])
    real = torch.tensor([[True, True], [True, False], [True, False], [True, False], [False, False], [False, False]])
    prior = torch.tensor([[0.5, 0.25], [0.5, 9.0], [0.2, 9.0], [0.2, 9.0], [9.0, 9.0], [9.0, 9.0]])
    model.set_neighbours(index, real, prior)
    history = torch.tensor([[0, 2], [4, 4]])
    mask = torch.tensor([[True, True], [True, False]])
    # At the start both the scale and the corrections are 0: no residual, the towers alone.
    assert not model.history_scores(history, mask).any()
    with torch.no_grad():
        model.residual_scale.fill_(2.0)
        model.neighbour_weight[0, 0] = 1.0
    scores = model.history_scores(history, mask)
    root = 2 ** 0.5
    # User 0 read items 0 and 2: item 1 gets 1 + 2·0.5, item 2 gets 2·0.25, item 3 gets 2·0.2; padding adds nothing.
    assert torch.allclose(scores[0], torch.tensor([0.0, 2.0 / root, 0.5 / root, 0.4 / root, 0.0, 0.0]))
    assert not scores[1].any()  # item 4 has no neighbours
    # The warm start recomputes the neighbours of a new catalog rather than carry old indices.
    from recops.training.warm_start import DERIVED

    assert {"neighbour_index", "neighbour_real", "neighbour_prior", "neighbour_weight"} <= DERIVED
