"""Post-hoc EMA (gencli.diffusion.posthoc_ema): the power-function profile, the closed forms against a
transcription of NVlabs/edm2 ``training/phema.py`` (commit as fetched for issue 25; float64 numpy), and the
reconstruction of an EMA of another width from snapshots against that EMA tracked directly during a toy training
run (a Gaussian random walk of the weights, the roughest sequence a training run can be).

Tolerance of the reconstruction: ||reconstructed - direct|| <= 1% of ||direct - final raw weights|| (how far the
average is from the raw weights). Measured: 0.19% for sigma_rel 0.05 from profiles 0.03 / 0.10 with 20 snapshots
each over 2000 steps; 1e-15 when 0.05 is itself a tracked profile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gencli.diffusion.posthoc_ema import (
    MAX_SIGMA_REL,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    power_beta,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
    thin_snapshots,
)
from gencli.diffusion.schedule import ConfigError


# ----------------------------------------------------------------- the reference (NVlabs/edm2 training/phema.py)
def ref_exp_to_std(exp):
    exp = np.float64(exp)
    std = np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))
    return std


def ref_std_to_exp(std):
    std = np.float64(std)
    tmp = std.flatten() ** -2
    exp = [np.roots([1, 7, 16 - t, 12 - t]).real.max() for t in tmp]
    exp = np.float64(exp).reshape(std.shape)
    return exp


def ref_power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    a_exp = ref_std_to_exp(a_std)
    b_exp = ref_std_to_exp(b_std)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    t_max = np.maximum(a_ofs, b_ofs)
    num = (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp
    den = (a_exp + b_exp + 1) * t_max
    return num / den


def ref_power_function_beta(std, t_next, t_delta):
    beta = (1 - t_delta / t_next) ** (ref_std_to_exp(std) + 1)
    return beta


def ref_solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):  # => [in, out]
    in_ofs, in_std = np.broadcast_arrays(in_ofs, in_std)
    out_ofs, out_std = np.broadcast_arrays(out_ofs, out_std)
    rv = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    cv = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    A = ref_power_function_correlation(rv(in_ofs), rv(in_std), cv(in_ofs), cv(in_std))
    B = ref_power_function_correlation(rv(in_ofs), rv(in_std), cv(out_ofs), cv(out_std))
    X = np.linalg.solve(A, B)
    X = X / np.sum(X, axis=0)
    return X


# ----------------------------------------------------------------- closed forms
def test_gamma_and_sigma_rel_match_edm2():
    rels = np.array([0.01, 0.05, 0.1, 0.15, 0.25])
    np.testing.assert_allclose(sigma_rel_to_gamma(rels), ref_std_to_exp(rels), rtol=1e-13)
    np.testing.assert_allclose(gamma_to_sigma_rel(sigma_rel_to_gamma(rels)), rels, rtol=1e-12)
    np.testing.assert_allclose(gamma_to_sigma_rel([0.0, 3.0, 50.0]), ref_exp_to_std([0.0, 3.0, 50.0]), rtol=1e-15)
    # the paper's quoted pairs (section 3.1): 0.05 <-> 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(MAX_SIGMA_REL, rel=1e-15)
    for step in (1, 2, 10, 1000):
        assert power_beta(sigma_rel_to_gamma(0.07), step) == pytest.approx(ref_power_function_beta(0.07, step, 1),
                                                                          rel=1e-13)


def test_inner_products_and_coefficients_match_edm2():
    rng = np.random.default_rng(0)
    a_t, b_t = rng.uniform(100, 5000, 12), rng.uniform(100, 5000, 12)
    a_s, b_s = rng.uniform(0.02, 0.25, 12), rng.uniform(0.02, 0.25, 12)
    np.testing.assert_allclose(profile_inner_products(a_t, a_s, b_t, b_s),
                               ref_power_function_correlation(a_t, a_s, b_t, b_s), rtol=1e-13)
    in_t = np.repeat(np.arange(1, 11) * 400, 2)
    in_s = np.tile([0.05, 0.10], 10)
    ours = solve_coefficients(in_t, in_s, 4000, [0.03, 0.07, 0.2])
    ref = ref_solve_posthoc_coefficients(in_t, in_s, 4000, np.array([0.03, 0.07, 0.2]))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.sum(axis=0), 1.0, rtol=1e-12)


def test_the_tracked_average_has_the_power_profile_and_its_width():
    """Feeding one-hot weights theta_k = e_k shows the discrete EMA's weight on each step: they sum to 1, follow
    (gamma + 1) k^gamma / K^(gamma + 1), and their standard deviation over k / K is sigma_rel."""
    K = 1000

    class OneHot(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(K, dtype=torch.float64))

    net = OneHot()
    ema = PowerFunctionEMA(net, (0.05, 0.10))
    for k in range(1, K + 1):
        with torch.no_grad():
            net.w.zero_()
            net.w[k - 1] = 1.0
        ema.update(net)
    tau = np.arange(1, K + 1) / K
    for rel, gamma, avg in zip(ema.sigma_rels, ema.gammas, ema.emas):
        w = avg.w.detach().numpy()
        assert w.sum() == pytest.approx(1.0, rel=1e-12)
        continuous = (gamma + 1) * tau**gamma / K
        assert np.abs(w - continuous).max() < 0.02 * continuous.max()
        mean = (w * tau).sum()
        # sigma_rel is the profile's standard deviation in units of the training length t (eq. 123: over
        # p(tau) = (gamma + 1) tau^gamma on [0, 1], Var = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
        assert np.sqrt((w * (tau - mean) ** 2).sum()) == pytest.approx(rel, rel=0.02)


# ----------------------------------------------------------------- reconstruction from snapshots
class Weights(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))


def random_walk_run(profiles, direct_rels, steps=2000, every=100, d=500, also_at=None):
    """Train the toy sequence, snapshot ``profiles`` every ``every`` steps, track ``direct_rels`` directly."""
    g = torch.Generator().manual_seed(0)
    net = Weights(d)
    tracker, direct = PowerFunctionEMA(net, profiles), PowerFunctionEMA(net, direct_rels)
    snaps, direct_at = [], {}
    for k in range(1, steps + 1):
        with torch.no_grad():
            net.w += torch.randn(d, generator=g, dtype=torch.float64)
            net.seen += 1
        tracker.update(net)
        direct.update(net)
        if k % every == 0:
            snaps += tracker.snapshot()
        if k == also_at:
            direct_at = {rel: ema.w.detach().clone() for rel, ema in zip(direct_rels, direct.emas)}
    final = {rel: ema.w.detach().clone() for rel, ema in zip(direct_rels, direct.emas)}
    return net, snaps, final, direct_at


def rel_error(reconstructed, direct, raw):
    return float((reconstructed - direct).norm() / (direct - raw).norm())


def test_reconstruction_matches_an_ema_tracked_directly():
    net, snaps, direct, _ = random_walk_run((0.03, 0.10), (0.05,))
    assert len(snaps) == 40 and {s["sigma_rel"] for s in snaps} == {0.03, 0.10}
    state = reconstruct(snaps, 0.05)
    assert rel_error(state["w"], direct[0.05], net.w.detach()) < 0.01  # measured 0.0019
    assert int(state["seen"]) == 2000  # buffers come from the last snapshot, not averaged
    # and a plain average (no reconstruction) of the two tracked profiles is far off: the test can fail
    naive = 0.5 * (snaps[-1]["state"]["w"] + snaps[-2]["state"]["w"])
    assert rel_error(naive, direct[0.05], net.w.detach()) > 0.1


def test_reconstruction_with_edm2_profiles_at_other_widths_and_an_earlier_step():
    rels = (0.03, 0.05, 0.07, 0.15)
    net, snaps, direct, direct_at = random_walk_run((0.05, 0.10), rels, also_at=1000)
    raw = net.w.detach()
    # measured: 1e-15 (0.05 is a tracked profile), 0.0019, 3e-5, 4e-5 (4000 steps) / under 0.5% (2000)
    assert rel_error(reconstruct(snaps, 0.05)["w"], direct[0.05], raw) < 1e-10
    for rel in (0.03, 0.07, 0.15):
        assert rel_error(reconstruct(snaps, rel)["w"], direct[rel], raw) < 0.01, rel
    # at step 1000 from the snapshots taken up to then (the raw weights then are not kept: compare to 0.15's EMA)
    early = reconstruct(snaps, 0.07, step=1000)["w"]
    assert float((early - direct_at[0.07]).norm() / (direct_at[0.07] - direct_at[0.15]).norm()) < 0.02


def test_thinned_snapshots_stay_bounded_and_still_reconstruct():
    net, snaps, direct, _ = random_walk_run((0.03, 0.10), (0.05,), every=50)
    steps = sorted({s["step"] for s in snaps})
    kept = thin_snapshots(steps, 12)
    assert len(kept) <= 12 and kept[-1] == 2000 and set(kept) <= set(steps)
    assert np.diff(kept).min() == np.diff(kept).max()  # evenly spread
    thinned = [s for s in snaps if s["step"] in kept]
    assert rel_error(reconstruct(thinned, 0.05)["w"], direct[0.05], net.w.detach()) < 0.05
    assert thin_snapshots([100, 200, 300], 5) == [100, 200, 300]
    assert thin_snapshots([100, 200, 300, 400, 500], 2) == [400, 500]


def test_tracker_state_resumes_exactly():
    net = Weights(8)
    a = PowerFunctionEMA(net, (0.05, 0.10))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        with torch.no_grad():
            net.w += torch.randn(8, generator=g, dtype=torch.float64)
        a.update(net)
    b = PowerFunctionEMA(Weights(8), (0.05, 0.10))
    b.load_state_dict(a.state_dict())
    assert int(b.steps) == 5
    with torch.no_grad():
        net.w += 1.0
    a.update(net)
    b.update(net)
    for ea, eb in zip(a.emas, b.emas):
        torch.testing.assert_close(ea.w, eb.w, rtol=0, atol=0)


@pytest.mark.parametrize("build, match", [
    (lambda: PowerFunctionEMA(Weights(2), (0.05, 0.05)), r"ema.sigma_rels=\[0.05, 0.05\]"),
    (lambda: PowerFunctionEMA(Weights(2), (0.3,)), "ema.sigma_rels=0.3"),
    (lambda: reconstruct([], 0.05), "no post-hoc EMA snapshots"),
    (lambda: reconstruct(random_walk_run((0.05, 0.1), (0.05,), steps=200, d=2)[1], 0.0), "ema.sigma_rel=0.0"),
    (lambda: reconstruct(random_walk_run((0.05, 0.1), (0.05,), steps=200, d=2)[1], 0.05, step=150),
     "ema.step=150"),
    (lambda: thin_snapshots([1, 2, 3], 1), "ema.max_snapshots=1"),
])
def test_bad_settings_are_refused_by_name(build, match):
    with pytest.raises(ConfigError, match=match):
        build()
