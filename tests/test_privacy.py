"""The privacy accountant (`fedmi.privacy`): Google's dp-accounting composing the Gaussian mechanism,
checked against the textbook single Gaussian mechanism and against its own properties."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedmi.errors import FedmiError
from fedmi.privacy import PrivacyAccountant, calibrate_noise


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """ε of one Gaussian mechanism with sensitivity 1 and noise σ, by the analytic Gaussian mechanism
    (Balle & Wang 2018, Theorem 8): δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ), solved for ε."""
    def gap(eps):
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta
    return brentq(gap, 0.0, 100.0)


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0, 5.0])
def test_one_gaussian_mechanism_matches_the_textbook(sigma):
    acc = PrivacyAccountant(delta=1e-5)
    acc.spend(noise_multiplier=sigma)
    exact = exact_gaussian_epsilon(sigma, 1e-5)
    assert acc.epsilon() == pytest.approx(exact, rel=2e-3)  # the PLD's discretisation, no more
    rdp = PrivacyAccountant(delta=1e-5, backend="rdp")
    rdp.spend(noise_multiplier=sigma)
    assert exact <= rdp.epsilon() <= 1.5 * exact  # Rényi DP: an upper bound, not far above
    # the classical bound sigma >= sqrt(2 ln(1.25/δ)) / ε is looser still, where it applies (ε < 1)
    classical = math.sqrt(2 * math.log(1.25 / 1e-5)) / sigma
    if classical < 1:
        assert acc.epsilon() < classical


def test_epsilon_grows_with_rounds_falls_with_noise_and_with_sampling():
    def eps(z, q, rounds):
        acc = PrivacyAccountant(1e-5, pld_interval=1e-3)  # coarser: these are orderings, not values
        acc.spend(z, q, rounds)
        return acc.epsilon()

    assert eps(1.0, 0.1, 10) < eps(1.0, 0.1, 40) < eps(1.0, 0.1, 160)
    assert eps(2.0, 0.1, 40) < eps(1.0, 0.1, 40)
    assert eps(1.0, 0.05, 40) < eps(1.0, 0.2, 40) < eps(1.0, 1.0, 40)
    # rounds spent one at a time compose to the same budget as spent at once
    acc = PrivacyAccountant(1e-5, pld_interval=1e-3)
    for _ in range(10):
        acc.spend(1.0, 0.1)
    assert acc.rounds == 10 and len(acc.history) == 1 and acc.epsilon() == pytest.approx(eps(1.0, 0.1, 10), rel=1e-9)
    assert PrivacyAccountant(1e-5).epsilon() == 0.0  # nothing spent


def test_calibration_hits_the_target_within_one_percent():
    z = calibrate_noise(2.0, 1e-5, rounds=20, sampling_rate=0.5, pld_interval=1e-3)
    acc = PrivacyAccountant(1e-5, pld_interval=1e-3)
    acc.spend(z, 0.5, 20)
    assert 0.99 * 2.0 <= acc.epsilon() <= 2.0
    assert calibrate_noise(1.0, 1e-5, rounds=1) == pytest.approx(exact_sigma(1.0, 1e-5), rel=1e-3)


def exact_sigma(epsilon: float, delta: float) -> float:
    return brentq(lambda s: exact_gaussian_epsilon(s, delta) - epsilon, 0.3, 50.0)


def test_the_accountant_resumes_from_its_state():
    acc = PrivacyAccountant(1e-6, pld_interval=1e-3)
    acc.spend(1.2, 0.2, 5)
    acc.spend(0.9, 0.2, 3)
    again = PrivacyAccountant.from_state(acc.state_dict())
    assert again.history == acc.history and again.epsilon() == acc.epsilon()
    again.spend(0.9, 0.2, 1)
    assert again.rounds == 9 and again.epsilon() > acc.epsilon()


@pytest.mark.parametrize("build", [
    lambda: PrivacyAccountant(0.0), lambda: PrivacyAccountant(1.0), lambda: PrivacyAccountant(1e-5, "moments"),
    lambda: PrivacyAccountant(1e-5).spend(0.0), lambda: PrivacyAccountant(1e-5).spend(1.0, 1.5),
    lambda: PrivacyAccountant(1e-5).spend(1.0, 0.1, 0), lambda: calibrate_noise(-1.0, 1e-5, 10),
])
def test_bad_settings_are_refused(build):
    with pytest.raises(FedmiError):
        build()
