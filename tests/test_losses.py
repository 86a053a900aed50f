"""Losses against naive per-element computations written from the papers' formulas."""

import math

import pytest
import torch

from selfsight.errors import ConfigError
from selfsight.losses import dino_loss, info_nce, negative_cosine, nt_xent, update_center


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def naive_info_nce_in_batch(q, k, t):
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        qi = _unit(q[i])
        sims = [_dot(qi, _unit(k[j])) / t for j in range(n)]
        total += -sims[i] + math.log(sum(math.exp(s) for s in sims))
    return total / n


def naive_info_nce_queue(q, k, queue, t):
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        qi = _unit(q[i])
        positive = _dot(qi, _unit(k[i])) / t
        negatives = [_dot(qi, _unit(queue[j])) / t for j in range(queue.shape[0])]
        total += -positive + math.log(math.exp(positive) + sum(math.exp(s) for s in negatives))
    return total / n


def naive_nt_xent(z1, z2, t):
    n = z1.shape[0]
    views = [_unit(v) for v in list(z1) + list(z2)]
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        denominator = sum(math.exp(_dot(views[a], views[b]) / t) for b in range(2 * n) if b != a)
        total += -_dot(views[a], views[positive]) / t + math.log(denominator)
    return total / (2 * n)


def naive_dino(students, teachers, center, ts, tt):
    terms = []
    for ti, teacher in enumerate(teachers):
        for si, student in enumerate(students):
            if ti == si:
                continue
            per_sample = []
            for n in range(teacher.shape[0]):
                t_exp = [math.exp((float(teacher[n, k]) - float(center[0, k])) / tt) for k in range(teacher.shape[1])]
                s_exp = [math.exp(float(student[n, k]) / ts) for k in range(student.shape[1])]
                t_sum, s_sum = sum(t_exp), sum(s_exp)
                per_sample.append(-sum((te / t_sum) * math.log(se / s_sum) for te, se in zip(t_exp, s_exp)))
            terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_info_nce_in_batch_matches_naive(temperature):
    q, k = _randn(4, 3, seed=0), _randn(4, 3, seed=1)
    got = info_nce(q, k, temperature)
    assert got.ndim == 0
    assert float(got) == pytest.approx(naive_info_nce_in_batch(q, k, temperature), rel=1e-9)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_info_nce_queue_matches_naive(temperature):
    q, k, queue = _randn(4, 3, seed=0), _randn(4, 3, seed=1), _randn(6, 3, seed=2)
    got = info_nce(q, k, temperature, negatives=queue)
    assert float(got) == pytest.approx(naive_info_nce_queue(q, k, queue, temperature), rel=1e-9)


def test_info_nce_modes_differ_and_are_scale_invariant():
    q, k, queue = _randn(4, 3, seed=0), _randn(4, 3, seed=1), _randn(6, 3, seed=2)
    # inputs are normalised inside: rescaling rows changes nothing
    scale = torch.tensor([[0.5], [2.0], [3.0], [7.0]], dtype=torch.float64)
    assert torch.allclose(info_nce(q * scale, k, 0.5), info_nce(q, k * scale, 0.5))
    assert torch.allclose(info_nce(q, k, 0.5, queue), info_nce(q * scale, k, 0.5, queue * 4))
    assert not torch.allclose(info_nce(q, k, 0.5), info_nce(q, k, 0.5, queue))


def test_info_nce_gradient_reaches_query_not_negatives():
    q = _randn(4, 3, seed=0).requires_grad_(True)
    k, queue = _randn(4, 3, seed=1), _randn(6, 3, seed=2)
    assert not queue.requires_grad
    loss = info_nce(q, k, 0.2, negatives=queue)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert queue.grad is None


def test_info_nce_temperature_scales_logits():
    # one key that equals its query plus one orthogonal queue entry: loss = log(1 + exp(-1/t))
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    for t in (0.1, 0.5, 1.0):
        assert float(info_nce(q, q, t, queue)) == pytest.approx(math.log(1 + math.exp(-1 / t)), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_naive(temperature):
    z1, z2 = _randn(4, 3, seed=3), _randn(4, 3, seed=4)
    assert float(nt_xent(z1, z2, temperature)) == pytest.approx(naive_nt_xent(z1, z2, temperature), rel=1e-9)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_aligned_pairs_orthogonal_others_is_analytic(temperature):
    n = 3
    z = torch.eye(n, dtype=torch.float64)  # pairs identical, different images orthogonal
    # each anchor: positive cos 1, 2N-2 negatives cos 0 -> -1/t + log(exp(1/t) + 2N - 2)
    expected = -1 / temperature + math.log(math.exp(1 / temperature) + 2 * n - 2)
    assert float(nt_xent(z, z.clone(), temperature)) == pytest.approx(expected, rel=1e-9)
    # as t -> 0 it approaches 0
    assert float(nt_xent(z, z, 0.01)) < 1e-30


def test_nt_xent_is_symmetric_in_views():
    z1, z2 = _randn(4, 3, seed=3), _randn(4, 3, seed=4)
    assert torch.allclose(nt_xent(z1, z2, 0.3), nt_xent(z2, z1, 0.3))


def test_negative_cosine_limits_and_value():
    p = _randn(4, 3, seed=5)
    assert float(negative_cosine(p, p)) == pytest.approx(0.0, abs=1e-12)
    assert float(negative_cosine(p, 3 * p)) == pytest.approx(0.0, abs=1e-12)
    assert float(negative_cosine(p, -p)) == pytest.approx(4.0)
    e = torch.eye(3)
    assert float(negative_cosine(e[:2], e[1:])) == pytest.approx(2.0)
    z = _randn(4, 3, seed=6)
    expected = sum(2 - 2 * _dot(_unit(p[i]), _unit(z[i])) for i in range(4)) / 4
    assert float(negative_cosine(p, z)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("student_temp,teacher_temp", [(0.1, 0.04), (1.0, 1.0)])
def test_dino_loss_matches_naive(student_temp, teacher_temp):
    n, k = 4, 5
    students = [_randn(n, k, seed=10 + v) for v in range(4)]  # 2 global + 2 local views
    teachers = [_randn(n, k, seed=20 + v) for v in range(2)]
    center = _randn(1, k, seed=30)
    expected = naive_dino(students, teachers, center, student_temp, teacher_temp)
    got_lists = dino_loss(students, teachers, center, student_temp, teacher_temp)
    got_stacked = dino_loss(torch.cat(students), torch.cat(teachers), center, student_temp, teacher_temp, batch_size=n)
    assert float(got_lists) == pytest.approx(expected, rel=1e-9)
    assert float(got_stacked) == pytest.approx(expected, rel=1e-9)


def test_dino_loss_uniform_is_log_k():
    k = 7
    students = [torch.full((3, k), 2.0) for _ in range(3)]
    teachers = [torch.full((3, k), -1.0) for _ in range(2)]
    center = torch.zeros(1, k)
    assert float(dino_loss(students, teachers, center, 0.1, 0.04)) == pytest.approx(math.log(k), rel=1e-6)


def test_dino_loss_center_and_gradients():
    n, k = 4, 5
    students = [_randn(n, k, seed=v).requires_grad_(True) for v in range(2)]
    teachers = [_randn(n, k, seed=10 + v).requires_grad_(True) for v in range(2)]
    # a centre equal along K changes nothing (softmax is shift invariant)
    base = dino_loss(students, teachers, torch.zeros(1, k, dtype=torch.float64), 0.1, 0.04)
    shifted = dino_loss(students, teachers, torch.full((1, k), 3.0, dtype=torch.float64), 0.1, 0.04)
    assert torch.allclose(base, shifted)
    base.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    assert all(t.grad is None for t in teachers)  # the teacher is detached inside


def test_dino_loss_needs_batch_size_for_stacked_and_valid_temps():
    with pytest.raises(ValueError, match="batch_size"):
        dino_loss(torch.zeros(8, 3), torch.zeros(8, 3), torch.zeros(1, 3), 0.1, 0.04)
    with pytest.raises(ConfigError):
        nt_xent(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


def test_update_center_is_ema_of_batch_mean():
    center = torch.tensor([[1.0, 2.0, 3.0]])
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 6.0]])  # mean [1, 2, 3]
    logits = logits + torch.tensor([[1.0, 0.0, -1.0]])  # mean [2, 2, 2]
    new = update_center(center, logits, 0.9)
    assert torch.allclose(new, torch.tensor([[1.1, 2.0, 2.9]]))
    assert torch.equal(center, torch.tensor([[1.0, 2.0, 3.0]]))  # not modified in place
    assert torch.allclose(update_center(center, list(logits.split(1)), 0.9), new)
    assert torch.allclose(update_center(center, logits, 0.0), torch.full((1, 3), 2.0))
