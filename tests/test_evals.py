"""kNN (faiss search and the training monitor's exact one) equals a brute-force reference and a hand-computed vote;
the linear probe leaves the backbone bit-identical and learns."""
import torch
import torch.nn.functional as F

from evals.features import extract_features
from evals.knn import knn_classify, weighted_vote
from evals.linear import linear_probe_cached, state_digest
from replicate.core.config import Setting
from replicate.core.data import load_digits_split
from replicate.core.model import build_vit
from replicate.runtime.monitor import weighted_knn_predict
from replicate.study.profiles import SMOKE


def brute_force_knn(train, train_y, test, k, t, num_classes):
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(test), num_classes)
    for i in range(len(test)):
        for s, j in zip(top[i], idx[i]):
            votes[i, train_y[j]] += torch.exp(s / t)
    return votes.argmax(1)


def test_knn_matches_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 16, generator=g), torch.randn(37, 16, generator=g)  # fewer than a chunk
    train_y = torch.randint(0, 13, (500,), generator=g)
    for k, t in ((20, 0.07), (5, 0.5), (1, 0.07)):
        ours = knn_classify(train, train_y, test, k=k, t=t, num_classes=13, chunk=16)
        ref = brute_force_knn(train, train_y, test, k, t, 13)
        assert torch.equal(ours, ref)


def test_weighted_vote_by_hand():
    """One query, neighbours with similarities 0.5 (class 0), 0.4 and 0.4 (class 1). t = 1: class 0 gets
    e^0.5 = 1.65, class 1 gets 2 e^0.4 = 2.98, the two votes win. t = 0.07: e^(0.5/0.07) = 1265 against
    2 e^(0.4/0.07) = 606, the nearer one wins."""
    sims, labels = torch.tensor([[0.5, 0.4, 0.4]]), torch.tensor([[0, 1, 1]])
    assert weighted_vote(sims, labels, num_classes=3, t=1.0).tolist() == [1]
    assert weighted_vote(sims, labels, num_classes=3, t=0.07).tolist() == [0]


def test_monitor_knn_matches_brute_force_reference():
    g = torch.Generator().manual_seed(2)
    bank, query = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    bank_y = torch.randint(0, 7, (300,), generator=g)
    for k, t in ((20, 0.07), (3, 0.5)):
        ours = weighted_knn_predict(query, bank, bank_y, 7, k, t)
        assert torch.equal(ours, brute_force_knn(bank, bank_y, query, k, t, 7))


def test_knn_separable_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 8, generator=g) * 5
    y = torch.arange(300) % 3
    x = centers[y] + 0.1 * torch.randn(300, 8, generator=g)
    assert torch.equal(knn_classify(x[:200], y[:200], x[200:]), y[200:])


def test_linear_probe_frozen_backbone_and_beats_chance_on_digits():
    cfg = SMOKE.resolve(Setting())
    torch.manual_seed(0)
    backbone = build_vit(cfg)
    before = state_digest(backbone)
    train, test = load_digits_split("train", cfg.image_size), load_digits_split("test", cfg.image_size)
    ftr, ytr = extract_features(backbone, train, "digits")
    fte, yte = extract_features(backbone, test, "digits")
    acc = linear_probe_cached(ftr, ytr, fte, yte, epochs=20, batch_size=128, base_lr=0.5)
    assert state_digest(backbone) == before
    assert backbone.training  # extract_features restores the mode it found
    assert acc > 60.0  # chance is 10%
