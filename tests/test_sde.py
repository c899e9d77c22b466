"""sde.py against independent closed forms: interpolants, Eq. 8, Eqs. 10-11, Eq. 7 / Prop. 1, time grids.

Everything runs on CPU in float64 unless a test is about float32. The Gaussian mixture is the
"pretrained model": its velocity is exact, so conversions are checked to rounding error, and the
samplers are checked against the data moments with tolerances derived from the sample size.
"""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import sde
from sde import (CosineInterpolant, GaussianMixtureFlow, LinearInterpolant, PolynomialInterpolant, VPInterpolant)

F64 = torch.float64
INTERPOLANTS = [LinearInterpolant(), VPInterpolant(), PolynomialInterpolant(2), PolynomialInterpolant(0.5),
                CosineInterpolant()]
IDS = [i.name for i in INTERPOLANTS]

# A 2-D mixture with three separated, unequal modes (used everywhere below).
MEANS = torch.tensor([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], dtype=F64)
STDS = torch.tensor([0.4, 0.5, 0.3], dtype=F64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)


def mixture(interpolant=None) -> GaussianMixtureFlow:
    return GaussianMixtureFlow(MEANS, STDS, WEIGHTS, interpolant or LinearInterpolant())


def points(n: int, seed: int, lo: float = 0.05, hi: float = 0.95):
    """n points x (n, 2) around the data and n times t (n,) in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, 2, generator=g, dtype=F64), lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)


def reference_log_prob(x_t, t, interpolant):
    """log p_t(x_t) built with torch.distributions, independently of GaussianMixtureFlow (one t per call)."""
    c = interpolant(t)
    scale = torch.sqrt(c.alpha_t**2 * STDS**2 + c.sigma_t**2)  # (K,)
    comps = Independent(Normal(c.alpha_t * MEANS, scale[:, None].expand_as(MEANS)), 1)
    return MixtureSameFamily(Categorical(probs=WEIGHTS), comps).log_prob(x_t)


# -----------------------------------------------------------------------------------------------
# Interpolants


@pytest.mark.parametrize("interp", INTERPOLANTS, ids=IDS)
def test_derivatives_match_finite_differences(interp):
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    h = 1e-6  # central differences: truncation O(h^2) ~ 1e-12, rounding ~ 1e-16 / h = 1e-10
    c, c_plus, c_minus = interp(t), interp(t + h), interp(t - h)
    torch.testing.assert_close(c.d_alpha_t, (c_plus.alpha_t - c_minus.alpha_t) / (2 * h), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(c.d_sigma_t, (c_plus.sigma_t - c_minus.sigma_t) / (2 * h), rtol=1e-7, atol=1e-8)
    assert torch.all(c.d_alpha_t < 0) and torch.all(c.d_sigma_t > 0)


@pytest.mark.parametrize("interp", INTERPOLANTS, ids=IDS)
def test_snr_inverse_round_trips(interp):
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    c = interp(t)
    torch.testing.assert_close(interp.snr_inverse(c.alpha_t / c.sigma_t), t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("interp", INTERPOLANTS, ids=IDS)
def test_boundary_values(interp):
    c0, c1 = interp(torch.tensor(0.0, dtype=F64)), interp(torch.tensor(1.0, dtype=F64))
    assert c0.alpha_t == 1 and c0.sigma_t == 0 and c1.sigma_t == pytest.approx(1, abs=1e-4)
    if interp.name == "vp":
        # alpha_1 = exp(-(beta_min + (beta_max - beta_min) / 2) / 2): the VP path never reaches pure noise
        assert c1.alpha_t == pytest.approx(math.exp(-0.5 * (0.1 + 0.5 * 19.9)), rel=1e-12)
    else:
        assert c1.alpha_t == pytest.approx(0, abs=1e-15) and c1.sigma_t == 1
    # SNR endpoints: rho = inf is data (t = 0); rho = 0 is pure noise, beyond the end of the VP path
    rho = torch.tensor([math.inf, 0.0], dtype=F64)
    expected = [0.0, math.inf] if interp.name == "vp" else [0.0, 1.0]
    assert interp.snr_inverse(rho).tolist() == expected
    if interp.name in ("vp", "cosine"):  # variance preserving
        c = interp(torch.linspace(0, 1, 11, dtype=F64))
        torch.testing.assert_close(c.alpha_t**2 + c.sigma_t**2, torch.ones(11, dtype=F64))


def test_get_interpolant_names():
    assert sde.get_interpolant("linear") == LinearInterpolant()
    assert sde.get_interpolant("vp") == VPInterpolant(0.1, 20.0)
    assert sde.get_interpolant("polynomial-3") == PolynomialInterpolant(3.0)
    assert sde.get_interpolant("cosine").name == "cosine"
    for bad in ("ot", "polynomial-x", "polynomial--1", "VP"):
        with pytest.raises(ValueError, match="linear"):
            sde.get_interpolant(bad)


def test_snr_matched_times_match_the_paper_table():
    # the paper's App. C: VP times 1.0, 0.6, 0.4359 correspond to CondOT times 0.9935, 0.8591, 0.7087
    s = torch.tensor([1.0, 0.6, 0.4359], dtype=F64)
    t_s = sde.conversion_coeffs(s, LinearInterpolant(), VPInterpolant()).t_s
    torch.testing.assert_close(t_s, torch.tensor([0.9935, 0.8591, 0.7087], dtype=F64), rtol=0, atol=6e-5)


def test_the_two_halves_of_the_vp_conversion():
    s = sde.time_grid(10, "exp")
    t, k = sde.vp_conversion_halves(s)
    vp, lin = VPInterpolant()(s[:-1]), LinearInterpolant()(t[:-1])
    torch.testing.assert_close(lin.alpha_t / lin.sigma_t, vp.alpha_t / vp.sigma_t, rtol=1e-10, atol=0)  # same SNR
    assert t[-1] == 0 and bool((t[:-1] > t[1:]).all())
    c_s = vp.sigma_t / lin.sigma_t
    # the Linear-SDE's noise variance g^2 k^2 dt is the VP-SDE's g^2 ds, carried to the linear path by 1 / c_s^2
    torch.testing.assert_close(k**2 * (t[:-1] - t[1:]), (s[:-1] - s[1:]) / c_s**2, rtol=1e-12, atol=0)
    assert k[0] > 3 and k[-1] < 1  # the "noise overdose" of scaling alone is early (Sec. 5)


def test_a_linear_sde_step_with_both_halves_is_the_vp_sde_step_to_first_order():
    # One Euler-Maruyama step of the VP-SDE from bar_x at s, read on the linear path (x = bar_x / c),
    # against one step of the Linear-SDE from bar_x / c_s at t_s to t_{s - h} with g scaled by k, same
    # noise: the two differ by O(h^1.5) (the scale c moves within the step), so by ~2.8x per halving of h.
    flow = mixture()
    vp_flow = flow.with_interpolant(VPInterpolant())
    g = sde.DiffusionCoefficient("square", 3.0)
    bar_x = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    gaps = []
    for h in (0.02, 0.01, 0.005, 0.0025):
        s = torch.tensor([0.6, 0.6 - h, 0.0], dtype=F64)
        t, k = sde.vp_conversion_halves(s)
        c = sde.conversion_coeffs(s[:2], LinearInterpolant(), VPInterpolant()).c_s
        vp_next = sde.euler_maruyama_step(bar_x, vp_flow.velocity(bar_x, s[0]), s[0], s[1], VPInterpolant(), g,
                                          noise=z) / c[1]
        x = bar_x / c[0]
        lin_next = sde.euler_maruyama_step(x, flow.velocity(x, t[0]), t[0], t[1], LinearInterpolant(),
                                           lambda _: g(s[0]) * k[0], noise=z)
        gaps.append(float((vp_next - lin_next).norm(dim=1).mean()))
    orders = [math.log2(a / b) for a, b in zip(gaps, gaps[1:])]
    assert all(1.3 < o < 2.2 for o in orders), (gaps, orders)


# -----------------------------------------------------------------------------------------------
# Parameterisation conversions (Eq. 8 and Tweedie)


@pytest.mark.parametrize("interp", INTERPOLANTS, ids=IDS)
def test_conversion_round_trips(interp):
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 64, 3, 5, generator=g, dtype=F64)  # (B, L, D) each, as latents are
    t = torch.linspace(0.05, 0.95, 64, dtype=F64)  # (B,), broadcast by Coeffs.like
    c = interp(t)
    x0_hat = sde.x0_hat_from_velocity(u, x, c)
    eps_hat = sde.eps_hat_from_velocity(u, x, c)
    score = sde.score_from_velocity(u, x, c)
    cb = c.like(x)
    torch.testing.assert_close(cb.alpha_t * x0_hat + cb.sigma_t * eps_hat, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sde.velocity_from_x0_hat(x0_hat, x, c), u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sde.velocity_from_eps_hat(eps_hat, x, c), u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sde.velocity_from_score(score, x, c), u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(score, -eps_hat / cb.sigma_t, rtol=1e-12, atol=1e-12)


def test_eq8_for_the_linear_path_reads_as_in_the_paper():
    # score = -(x + (1 - t) u) / t and x0_hat = x - t u for alpha = 1 - t, sigma = t
    x, t = points(16, 1)
    u = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    c = LinearInterpolant()(t)
    torch.testing.assert_close(sde.score_from_velocity(u, x, c), -(x + (1 - t[:, None]) * u) / t[:, None])
    torch.testing.assert_close(sde.x0_hat_from_velocity(u, x, c), x - t[:, None] * u)


def test_coefficient_shapes_are_checked():
    x = torch.zeros(4, 3, 2, dtype=F64)
    with pytest.raises(ValueError, match="per-sample"):
        sde.score_from_velocity(x, x, LinearInterpolant()(torch.full((3,), 0.5, dtype=F64)))


@pytest.mark.parametrize("interp", INTERPOLANTS, ids=IDS)
def test_score_from_velocity_equals_the_analytic_mixture_score(interp):
    flow = mixture(interp)
    x, t = points(12, 3)
    score = sde.score_from_velocity(flow.velocity(x, t), x, interp(t))
    for i in range(len(t)):  # autograd of an independently built log-density, one time at a time
        xi = x[i:i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(reference_log_prob(xi, t[i], interp).sum(), xi)
        torch.testing.assert_close(score[i:i + 1], grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(flow.score(x, t), score, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flow.log_prob(x, t), torch.stack([reference_log_prob(x[i], t[i], interp)
                                                                 for i in range(len(t))]))
    torch.testing.assert_close(sde.x0_hat_from_velocity(flow.velocity(x, t), x, interp(t)), flow.x0_hat(x, t))


@pytest.mark.parametrize("interp", INTERPOLANTS, ids=IDS)
def test_mixture_velocity_solves_the_continuity_equation(interp):
    # d/dt log p_t + div u_t + u_t . grad log p_t = 0 (Eq. 6 transports p_t); d/dt by central
    # differences (h = 1e-5: error ~ h^2 = 1e-10), div u by autograd. Independent of how u was derived.
    flow, h = mixture(interp), 1e-5
    x, t = points(8, 4)
    d_log_p = (flow.log_prob(x, t + h) - flow.log_prob(x, t - h)) / (2 * h)
    x = x.clone().requires_grad_(True)
    u = flow.velocity(x, t)
    div = sum(torch.autograd.grad(u[:, d].sum(), x, retain_graph=True)[0][:, d] for d in range(2))
    residual = d_log_p + div + (u * flow.score(x, t)).sum(-1)
    torch.testing.assert_close(residual.detach(), torch.zeros(8, dtype=F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("interp", INTERPOLANTS, ids=IDS)
def test_corollary_1_forward_drift_loses_its_score_term(interp):
    # App. B Cor. 1: with g^2 = 2 (sigma d_sigma - sigma^2 d_alpha / alpha), u + (g^2 / 2) score = (d_alpha / alpha) x
    flow = mixture(interp)
    x, t = points(32, 5)
    c = interp(t)
    g_t = torch.sqrt(2 * (c.sigma_t * c.d_sigma_t - c.sigma_t**2 * c.d_alpha_t / c.alpha_t))
    u = flow.velocity(x, t)
    forward_drift = 2 * u - sde.sde_drift(u, x, c, g_t)  # f_reverse = u - g^2/2 score
    torch.testing.assert_close(forward_drift, (c.d_alpha_t / c.alpha_t)[:, None] * x, rtol=1e-9, atol=1e-9)


# -----------------------------------------------------------------------------------------------
# Interpolant conversion (Eqs. 10-11)

PAIRS = [("linear", "vp"), ("vp", "linear"), ("linear", "cosine"), ("cosine", "vp"), ("linear", "polynomial-2"),
         ("polynomial-2", "linear"), ("vp", "polynomial-0.5")]


@pytest.mark.parametrize("source,target", PAIRS)
def test_converted_velocity_equals_the_exact_target_velocity(source, target):
    source, target = sde.get_interpolant(source), sde.get_interpolant(target)
    # s in [0.02, 0.98]: inside (0, 1) and, for a VP source, below s = 0.9935 where the linear SNR
    # drops under the VP path's smallest SNR alpha_1 / sigma_1
    x, s = points(64, 6, 0.02, 0.98)
    converted = sde.convert_velocity(mixture(source).velocity, source, target)
    torch.testing.assert_close(converted(x, s), mixture(target).velocity(x, s), rtol=0, atol=1e-8)


def test_conversion_to_the_same_path_is_the_identity_for_any_model():
    def model(x, t):  # an arbitrary nonlinear "network" on (B, L, D) latents
        return torch.sin(3 * x) * t[:, None, None] + x**2 - 1

    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    t = torch.linspace(0.01, 1.0, 6, dtype=F64)  # s = 1 is valid when the source is the linear path
    converted = sde.convert_velocity(model, LinearInterpolant(), PolynomialInterpolant(1))
    torch.testing.assert_close(converted(x, t), model(x, t), rtol=1e-12, atol=1e-12)


def test_conversion_calls_the_model_once_and_handles_latent_shapes():
    flow, calls = mixture(), []

    def model(x, t):  # (B, L, D) -> the mixture on the flattened (B, L * D) vector
        calls.append(t)
        return flow.velocity(x.reshape(len(x), -1), t).reshape(x.shape)  # (B, L, D)

    x, s = points(10, 8)
    converted = sde.convert_velocity(model, LinearInterpolant(), VPInterpolant())
    out = converted(x.reshape(10, 1, 2), s)  # (B, 1, 2)
    assert len(calls) == 1 and calls[0].shape == (10,)
    torch.testing.assert_close(out.reshape(10, 2), mixture(VPInterpolant()).velocity(x, s), rtol=0, atol=1e-8)
    converted(x.reshape(10, 1, 2), s[0])  # a scalar time reaches the model as a (B,) tensor
    assert len(calls) == 2 and calls[1].shape == (10,)


def test_conversion_keeps_float32():
    flow = GaussianMixtureFlow(MEANS.float(), STDS.float(), WEIGHTS.float())
    x, s = (a.float() for a in points(16, 9))
    out = sde.convert_velocity(flow.velocity, LinearInterpolant(), VPInterpolant())(x, s)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mixture(VPInterpolant()).velocity(x.double(), s.double()).float(),
                               rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------------------------
# Diffusion coefficients, steps


@pytest.mark.parametrize("interp", [LinearInterpolant(), VPInterpolant(), CosineInterpolant()], ids=lambda i: i.name)
def test_guidance_factor_is_eq_8_solved_for_the_velocity(interp):
    # u_t = (d_alpha_t / alpha_t) x - eta_t grad log p_t, with eta_t = sde.guidance_factor(c, g_t = 0),
    # on the exact mixture flow; and the SDE part adds g_t^2 / 2
    flow = mixture(interp)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=F64)
    c = interp(t)
    eta = sde.guidance_factor(c, 0.0)[:, None]
    u = (c.d_alpha_t / c.alpha_t)[:, None] * x - eta * flow.score(x, t)
    torch.testing.assert_close(u, flow.velocity(x, t), rtol=1e-9, atol=1e-9)
    g_t = torch.full_like(t, 0.7)
    torch.testing.assert_close(sde.guidance_factor(c, g_t), eta[:, 0] + 0.5 * 0.49, rtol=1e-12, atol=1e-12)


def test_diffusion_coefficients():
    t = torch.linspace(0, 1, 11, dtype=F64)
    g = sde.DiffusionCoefficient  # default: the paper's 3 t^2
    torch.testing.assert_close(g()(t), 3 * t**2)
    torch.testing.assert_close(g("zero")(t), torch.zeros_like(t))
    torch.testing.assert_close(g("constant", 2.0)(t), torch.full_like(t, 2.0))
    torch.testing.assert_close(g("linear", 2.0)(t), 2 * t)
    torch.testing.assert_close(g("sin", 1.0)(t), torch.sin(math.pi * t / 2))
    torch.testing.assert_close(g("clipping", 1.0)(t), torch.clamp(2 * t - 1, min=0))
    torch.testing.assert_close(g("exp", 1.0)(t), torch.exp(-((t - 1) / 0.1) ** 2))
    torch.testing.assert_close(g("tan", 1.0)(t), torch.tan(math.pi / 2 * torch.clamp(t, max=0.95)))
    torch.testing.assert_close(g("sigma", 1.0, interpolant=VPInterpolant())(t), VPInterpolant()(t).sigma_t)
    with pytest.raises(ValueError, match="interpolant"):
        g("sigma")
    with pytest.raises(ValueError, match="square"):
        g("quadratic")


def test_euler_maruyama_with_zero_diffusion_is_the_euler_step():
    flow, gen = mixture(), torch.Generator().manual_seed(10)
    x, _ = points(32, 10)
    t, t_next = torch.full((32,), 0.3, dtype=F64), torch.full((32,), 0.0, dtype=F64)  # t_next = 0 is fine for ODE
    u = flow.velocity(x, t)
    state = gen.get_state()
    out = sde.euler_maruyama_step(x, u, t, t_next, LinearInterpolant(), sde.DiffusionCoefficient("zero"), gen)
    assert torch.equal(out, sde.euler_step(x, u, t, t_next)) and torch.equal(out, x - 0.3 * u)
    assert torch.equal(gen.get_state(), state)  # no noise drawn
    with pytest.raises(ValueError, match="backward"):
        sde.euler_maruyama_step(x, u, 0.3, 0.4, LinearInterpolant(), sde.DiffusionCoefficient(), gen)


def test_euler_maruyama_step_moments():
    # Eq. 9: x_next ~ N(x - f dt, g^2 dt I). n = 20000 copies of one point; mean error SE = g sqrt(dt / n),
    # sample variance SE = g^2 dt sqrt(2 / n) (Gaussian); we allow 5 SE.
    n, t, t_next = 20000, 0.8, 0.7
    flow, g = mixture(), sde.DiffusionCoefficient()
    x = torch.tensor([[0.3, -0.4]], dtype=F64).expand(n, 2)
    u = flow.velocity(x, torch.full((n,), t, dtype=F64))
    out = sde.euler_maruyama_step(x, u, t, t_next, LinearInterpolant(), g, torch.Generator().manual_seed(11))
    g_t, dt = 3 * t**2, t - t_next
    mean = x[0] - dt * (u[0] - 0.5 * g_t**2 * flow.score(x[:1], torch.tensor([t], dtype=F64))[0])
    torch.testing.assert_close(out.mean(0), mean, rtol=0, atol=5 * g_t * math.sqrt(dt / n))
    torch.testing.assert_close(out.var(0), torch.full((2,), g_t**2 * dt, dtype=F64), rtol=0,
                               atol=5 * g_t**2 * dt * math.sqrt(2 / n))


# -----------------------------------------------------------------------------------------------
# Proposition 1 in practice: ODE and SDE samplers reach p0, on the linear and the VP-converted path

N_PARTICLES, N_STEPS = 4000, 400


def sample(kind: str, g_kind: str, seed: int, n: int = N_PARTICLES, num_steps: int = N_STEPS):
    """Euler(-Maruyama) from t = 1 to 0 for the linear path or the Linear -> VP converted model."""
    flow, gen = mixture(), torch.Generator().manual_seed(seed)
    if kind == "linear":
        interp, velocity = LinearInterpolant(), flow.velocity
        x = torch.randn(n, 2, generator=gen, dtype=F64)
    else:
        interp = VPInterpolant()
        velocity = sde.convert_velocity(flow.velocity, LinearInterpolant(), interp)
        # the VP path ends at alpha_1 = 0.0066, not pure noise: start from its exact marginal to test Prop. 1
        c = interp(torch.tensor(1.0, dtype=F64))
        x = c.alpha_t * flow.sample_data(n, gen) + c.sigma_t * torch.randn(n, 2, generator=gen, dtype=F64)
    g = sde.DiffusionCoefficient(g_kind)
    ts = sde.time_grid(num_steps)
    for t, t_next in zip(ts[:-1], ts[1:]):
        u = velocity(x, t.expand(n))
        x = sde.euler_maruyama_step(x, u, t, t_next, interp, g, gen)
    return x


def mixture_moments():
    """Mean, variance and fourth central moment per coordinate of p0 (closed forms for a Gaussian mixture)."""
    mu = (WEIGHTS[:, None] * MEANS).sum(0)
    d, s2 = MEANS - mu, STDS[:, None] ** 2  # (K, D), (K, 1)
    var = (WEIGHTS[:, None] * (d**2 + s2)).sum(0)
    m4 = (WEIGHTS[:, None] * (d**4 + 6 * d**2 * s2 + 3 * s2**2)).sum(0)  # E[(d + s z)^4]
    return mu, var, m4


@pytest.mark.parametrize("kind", ["linear", "vp"])
@pytest.mark.parametrize("g_kind", ["zero", "square"])
def test_samplers_reach_the_data_distribution(kind, g_kind):
    x = sample(kind, g_kind, seed=12)
    n = len(x)
    mu, var, m4 = mixture_moments()
    # Statistical tolerance: 5 standard errors from the sample size, SE(mean) = sqrt(var / n),
    # SE(sample variance) = sqrt((m4 - var^2) / n), SE(mode fraction) = sqrt(w (1 - w) / n). With 28
    # such checks over the four samplers a false alarm has probability < 28 * 6e-7.
    # Discretisation allowance: Euler(-Maruyama) has weak order 1, bias ~ C / N. Measured offline with
    # 2e5 particles at N = 50, 100, 200, 400 on this mixture (halving of the bias per doubling of N),
    # the worst of the four samplers has C ~ 3.6 for the variance, 0.3 for the mean, 0.1 for a mode
    # weight; we allow 2 C / N with C = 4, 0.5, 0.2. The modes overlap by < 1e-3 (means >= 3.5 apart,
    # stds <= 0.5), so the nearest-mode fractions estimate the weights.
    allowance = {"mean": 2 * 0.5 / N_STEPS, "var": 2 * 4.0 / N_STEPS, "weight": 2 * 0.2 / N_STEPS}
    torch.testing.assert_close(x.mean(0), mu, rtol=0, atol=5 * torch.sqrt(var / n).max() + allowance["mean"])
    torch.testing.assert_close(x.var(0), var, rtol=0, atol=5 * torch.sqrt((m4 - var**2) / n).max() + allowance["var"])
    modes = mixture().posterior_weights(x, 0.0).argmax(-1)
    fractions = torch.bincount(modes, minlength=3).to(F64) / n
    torch.testing.assert_close(fractions, WEIGHTS, rtol=0, atol=5 * math.sqrt(0.25 / n) + allowance["weight"])


def test_ode_map_is_deterministic_and_sde_follows_its_seed():
    n, steps = 256, 50
    ode_a, ode_b = sample("linear", "zero", seed=1, n=n, num_steps=steps), sample("linear", "zero", seed=1, n=n,
                                                                                 num_steps=steps)
    assert torch.equal(ode_a, ode_b)
    sde_a, sde_b = sample("vp", "square", seed=2, n=n, num_steps=steps), sample("vp", "square", seed=2, n=n,
                                                                               num_steps=steps)
    sde_c = sample("vp", "square", seed=3, n=n, num_steps=steps)
    assert torch.equal(sde_a, sde_b) and not torch.allclose(sde_a, sde_c)
    # the ODE map: the same start reached through different generators gives the same end point
    flow, x1 = mixture(), torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    ends = []
    for seed in (5, 6):
        x, gen, ts = x1, torch.Generator().manual_seed(seed), sde.time_grid(steps)
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = sde.euler_maruyama_step(x, flow.velocity(x, t), t, t_next, LinearInterpolant(),
                                        sde.DiffusionCoefficient("zero"), gen)
        ends.append(x)
    assert torch.equal(*ends)


# -----------------------------------------------------------------------------------------------
# Time grids and the mixture's own sampler


def test_time_grids():
    for kind in ("uniform", "exp"):
        for shift in (None, 3.0, sde.flux_shift(1024)):
            ts = sde.time_grid(10, kind, shift)
            assert ts.dtype == F64 and ts.shape == (11,) and ts[0] == 1 and ts[-1] == 0
            assert torch.all(ts[1:] < ts[:-1])
    uniform = torch.linspace(1, 0, 11, dtype=F64)
    torch.testing.assert_close(sde.time_grid(10), uniform)
    torch.testing.assert_close(sde.time_grid(10, "exp"), torch.sqrt(1 - (1 - uniform) ** 2))
    # the paper's App. C exp grid (10 steps)
    torch.testing.assert_close(sde.time_grid(10, "exp")[1:10], torch.tensor(
        [0.9950, 0.9798, 0.9539, 0.9165, 0.8660, 0.8000, 0.7141, 0.6000, 0.4359], dtype=F64), rtol=0, atol=5e-5)
    # FLUX-dev 4-step schedules of BFL's get_schedule (4096 and 1024 image tokens)
    torch.testing.assert_close(sde.time_grid(4, shift=sde.flux_shift(4096)),
                               torch.tensor([1, 0.9045, 0.7595, 0.5128, 0], dtype=F64), rtol=0, atol=5e-5)
    torch.testing.assert_close(sde.time_grid(4, shift=sde.flux_shift(1024)),
                               torch.tensor([1, 0.8492, 0.6525, 0.3849, 0], dtype=F64), rtol=0, atol=5e-5)
    for bad in (dict(num_steps=0), dict(num_steps=4, kind="cosine"), dict(num_steps=4, shift=0.0)):
        with pytest.raises(ValueError):
            sde.time_grid(**bad)


def test_sample_data_moments_and_validation():
    x = mixture().sample_data(20000, torch.Generator().manual_seed(13))
    mu, var, m4 = mixture_moments()
    n = len(x)  # 5 standard errors, as above
    torch.testing.assert_close(x.mean(0), mu, rtol=0, atol=5 * torch.sqrt(var / n).max())
    torch.testing.assert_close(x.var(0), var, rtol=0, atol=5 * torch.sqrt((m4 - var**2) / n).max())
    with pytest.raises(ValueError, match="std"):
        GaussianMixtureFlow(MEANS, torch.tensor([0.4, 0.0, 0.3]), WEIGHTS)
    with pytest.raises(ValueError, match="shape"):
        GaussianMixtureFlow(MEANS[0], STDS, WEIGHTS)
