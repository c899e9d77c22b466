"""
Stochastic generation for flow models: the paper's ideas 1 and 2, in one flat file.

Kim, Yoon, Hwang, Sung 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation and
Rollover Budget Forcing", arXiv 2503.19385. Equation numbers are those of the v5 / NeurIPS version.

Time convention (the only one used in this project, as in FLUX):

    t in [0, 1],  t = 1 is pure noise,  t = 0 is data,  sampling runs from t = 1 down to t = 0,
    x_t = alpha_t * x0 + sigma_t * eps,   eps ~ N(0, I),   alpha_0 = sigma_1 = 1,  alpha_1 = sigma_0 = 0.

A flow model predicts the velocity u_t(x) = E[d_alpha_t * x0 + d_sigma_t * eps | x_t = x]; for FLUX's
linear path (alpha_t = 1 - t, sigma_t = t) that is eps - x0, pointing from data to noise.

What is here, in reading order:

1. Interpolants (Sec. 4.3; the official code's schedulers): linear (CondOT, FLUX), VP, polynomial, cosine.
   Each returns `Coeffs(alpha_t, sigma_t, d_alpha_t, d_sigma_t)` and inverts its SNR alpha_t / sigma_t.
2. Parameterisation conversions: velocity <-> x0_hat (Tweedie) <-> eps_hat <-> score (Eq. 8).
3. Interpolant conversion (Eqs. 10-11): a velocity model trained on one path becomes the exact
   velocity of the same data on another path, at the price of one network call per evaluation.
   Linear -> VP is the paper's "VP-SDE" (Eq. 12). `to_source` and `target_velocity` are the two halves
   of Eq. 11 on given coefficients (search.py caches them per grid), `convert_velocity` wraps a model.
4. The reverse SDE with the flow's marginals (Eq. 7, App. B Prop. 1), the official code's diffusion
   coefficients g(t) (paper default 3 t^2), the factor with which a tilted score (Eq. 30, DPS) moves
   a step, the Euler ODE step (Eq. 6) and the Euler-Maruyama proposal (Eq. 9): `euler_maruyama` on
   given coefficients (search.py's grid), `euler_maruyama_step` from times.
5. Time grids: uniform, the paper's `exp` grid (App. C), FLUX's resolution shift.
6. GaussianMixtureFlow: the exact velocity of a Gaussian-mixture data distribution under any
   interpolant. It stands in for a pretrained model in the tests and notebooks, because every
   quantity above has a closed form for it.

Endpoints. x0_hat and eps_hat from a velocity are valid on all of [0, 1]. The score (Eq. 8), the SDE
drift and velocity_from_x0_hat divide by sigma_t, so they need t > 0; velocity_from_eps_hat and
velocity_from_score divide by alpha_t, so they need t < 1 (any t on the VP path, which never reaches
alpha_t = 0: alpha_1 = 0.0066). Nothing is clamped. The samplers evaluate velocity and drift at the
start of each step only, so they never touch t = 0.

References:
  [1] Kim et al. 2025, arXiv 2503.19385 (Eqs. 6-12, App. B Prop. 1, App. C; official code
      github.com/KAIST-Visual-AI-Group/Flow-Inference-Time-Scaling)
  [2] Lipman et al. 2024, "Flow Matching Guide and Code", arXiv 2412.06264 (schedulers, scheduler
      change of a trained model)
  [3] Song et al. 2021, "Score-Based Generative Modeling through SDEs", arXiv 2011.13456 (VP SDE,
      reverse-time SDE)
  [4] Ma et al. 2024, "SiT", arXiv 2401.08740 (SDE sampling of interpolant models with free g)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # u = velocity(x_t (B, *shape), t (B,)) -> (B, *shape)

# -----------------------------------------------------------------------------------------------
# 1. Interpolants x_t = alpha_t x0 + sigma_t eps


@dataclass
class Coeffs:
    """The interpolant at time t. Each field has the shape of t (or is broadcastable against it)."""

    alpha_t: Tensor  # data coefficient, 1 at t = 0, 0 (or nearly 0 for VP) at t = 1
    sigma_t: Tensor  # noise coefficient, 0 at t = 0, 1 at t = 1
    d_alpha_t: Tensor  # d alpha_t / dt (< 0)
    d_sigma_t: Tensor  # d sigma_t / dt (> 0)

    def like(self, x: Tensor) -> Coeffs:
        """The same coefficients cast to x's dtype/device and shaped (B, 1, ..., 1) to broadcast over x."""
        return Coeffs(*(_like(a, x) for a in (self.alpha_t, self.sigma_t, self.d_alpha_t, self.d_sigma_t)))


def _like(a: Tensor | float, x: Tensor) -> Tensor:
    """A per-sample coefficient of shape (), (B,) or x's ndim, made broadcastable against x (B, *shape)."""
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    if a.ndim == 0 or a.ndim == x.ndim:
        return a
    if a.ndim == 1 and a.shape[0] in (1, x.shape[0]):
        return a.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
    raise ValueError(f"a per-sample coefficient must have shape (), (B,) or x.ndim dims; got {tuple(a.shape)} "
                     f"for x of shape {tuple(x.shape)}")


def _time(t: Tensor | float) -> Tensor:
    """Python numbers become float64 tensors (they are doubles already); tensors keep their dtype."""
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64)


class Interpolant(Protocol):
    """What every interpolant offers: coefficients at t and the inverse of its SNR rho(t) = alpha_t / sigma_t."""

    @property
    def name(self) -> str: ...

    def __call__(self, t: Tensor) -> Coeffs: ...

    def snr_inverse(self, rho: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class LinearInterpolant:
    """The CondOT / rectified-flow path of FLUX: alpha_t = 1 - t, sigma_t = t. Valid on [0, 1]."""

    @property
    def name(self) -> str:
        return "linear"

    def __call__(self, t: Tensor) -> Coeffs:
        t = _time(t)
        return Coeffs(1 - t, t, -torch.ones_like(t), torch.ones_like(t))

    def snr_inverse(self, rho: Tensor) -> Tensor:
        # (1 - t) / t = rho  =>  t = 1 / (1 + rho); rho = inf gives t = 0, rho = 0 gives t = 1
        return 1 / (1 + _time(rho))


@dataclass(frozen=True)
class VPInterpolant:
    """The variance-preserving path of DDPM / score SDEs [3], time flipped so t = 1 is noise (as in [1]'s code).

    With B_t = int_0^t beta(r) dr = beta_min t + (beta_max - beta_min) t^2 / 2 (linear beta(r)):
    alpha_t = exp(-B_t / 2), sigma_t = sqrt(1 - exp(-B_t)), so alpha_t^2 + sigma_t^2 = 1.
    alpha_1 = exp(-5.025) = 0.0066 > 0: the path never reaches pure noise. d_sigma_t ~ 1/sqrt(t) is
    infinite at t = 0, so use t in (0, 1] wherever d_sigma_t enters.
    """

    beta_min: float = 0.1  # beta(0), the noise rate at the data end
    beta_max: float = 20.0  # beta(1), the noise rate at the noise end

    @property
    def name(self) -> str:
        return "vp"

    def __call__(self, t: Tensor) -> Coeffs:
        t = _time(t)
        B_t = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2  # int_0^t beta
        beta_t = self.beta_min + (self.beta_max - self.beta_min) * t  # beta(t) = dB_t / dt
        alpha_t = torch.exp(-0.5 * B_t)
        sigma_t = torch.sqrt(-torch.expm1(-B_t))  # expm1 keeps sigma_t accurate for small t
        d_alpha_t = -0.5 * beta_t * alpha_t
        d_sigma_t = 0.5 * beta_t * alpha_t**2 / sigma_t
        return Coeffs(alpha_t, sigma_t, d_alpha_t, d_sigma_t)

    def snr_inverse(self, rho: Tensor) -> Tensor:
        # rho^2 = e^{-B} / (1 - e^{-B})  =>  B = log(1 + 1 / rho^2); then solve the quadratic B_t = B for t.
        # The root is written in 1/B so that it is free of cancellation for small B and gives t = 0 for
        # rho = inf. rho below alpha_1 / sigma_1 = 0.0066 gives t > 1 (rho = 0: t = inf): not on the VP path.
        inv_B = 1 / torch.log1p(_time(rho) ** -2)
        d_beta = self.beta_max - self.beta_min
        return 2 / (self.beta_min * inv_B + torch.sqrt((self.beta_min * inv_B) ** 2 + 2 * d_beta * inv_B))


@dataclass(frozen=True)
class PolynomialInterpolant:
    """alpha_t = (1 - t)^n, sigma_t = 1 - (1 - t)^n (flow_matching's PolynomialConvexScheduler, time flipped).

    n = 1 is the linear path, so converting to it is the identity: the official code runs its
    Linear-SDE that way.
    """

    n: float = 1.0  # the exponent, > 0

    def __post_init__(self):
        if not self.n > 0:
            raise ValueError(f"PolynomialInterpolant needs an exponent n > 0, got {self.n}")

    @property
    def name(self) -> str:
        return f"polynomial-{self.n:g}"

    def __call__(self, t: Tensor) -> Coeffs:
        t = _time(t)
        alpha_t = (1 - t) ** self.n
        d_alpha_t = -self.n * (1 - t) ** (self.n - 1)
        return Coeffs(alpha_t, 1 - alpha_t, d_alpha_t, -d_alpha_t)

    def snr_inverse(self, rho: Tensor) -> Tensor:
        # alpha / (1 - alpha) = rho  =>  alpha = 1 / (1 + 1 / rho) = (1 - t)^n (this form is exact at rho = inf)
        return 1 - (1 / (1 + 1 / _time(rho))) ** (1 / self.n)


@dataclass(frozen=True)
class CosineInterpolant:
    """alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2): variance preserving and reaching pure noise at t = 1."""

    @property
    def name(self) -> str:
        return "cosine"

    def __call__(self, t: Tensor) -> Coeffs:
        t = _time(t)
        alpha_t, sigma_t = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
        return Coeffs(alpha_t, sigma_t, -0.5 * math.pi * sigma_t, 0.5 * math.pi * alpha_t)

    def snr_inverse(self, rho: Tensor) -> Tensor:
        # cot(pi t / 2) = rho  =>  t = (2 / pi) atan(1 / rho)
        return (2 / math.pi) * torch.atan(1 / _time(rho))


def get_interpolant(name: str) -> Interpolant:
    """An interpolant by name: "linear", "vp", "cosine" or "polynomial-<n>" (e.g. "polynomial-2")."""
    if name == "linear":
        return LinearInterpolant()
    if name == "vp":
        return VPInterpolant()
    if name == "cosine":
        return CosineInterpolant()
    if name.startswith("polynomial-"):
        try:
            return PolynomialInterpolant(float(name.removeprefix("polynomial-")))
        except ValueError:
            pass
    raise ValueError(f"unknown interpolant {name!r}; choose 'linear', 'vp', 'cosine' or 'polynomial-<n>' (n > 0)")


# -----------------------------------------------------------------------------------------------
# 2. Parameterisation conversions. Solving the 2x2 system
#        x_t = alpha_t x0 + sigma_t eps,   u_t = d_alpha_t x0 + d_sigma_t eps
#    for (x0, eps), with determinant det_t = alpha_t d_sigma_t - sigma_t d_alpha_t > 0, gives Tweedie's
#    x0_hat = E[x0 | x_t] and eps_hat = E[eps | x_t] from the velocity (u_t is linear in (x0, eps), so
#    the conditional means obey the same linear system). All functions are elementwise; c may have
#    shape () or (B,) and is broadcast over x (B, *shape) by Coeffs.like.


def x0_hat_from_velocity(u_t: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """Tweedie's estimate E[x0 | x_t] from the velocity; valid on all of [0, 1] (det_t > 0)."""
    c = c.like(x_t)
    return (c.d_sigma_t * x_t - c.sigma_t * u_t) / (c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t)


def eps_hat_from_velocity(u_t: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """E[eps | x_t] from the velocity; valid on all of [0, 1]."""
    c = c.like(x_t)
    return (c.alpha_t * u_t - c.d_alpha_t * x_t) / (c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t)


def velocity_from_x0_hat(x0_hat: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """u_t = d_alpha_t x0_hat + d_sigma_t eps_hat with eps_hat = (x_t - alpha_t x0_hat) / sigma_t; t in (0, 1]."""
    c = c.like(x_t)
    return c.d_alpha_t * x0_hat + c.d_sigma_t * (x_t - c.alpha_t * x0_hat) / c.sigma_t


def velocity_from_eps_hat(eps_hat: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """u_t = d_alpha_t x0_hat + d_sigma_t eps_hat with x0_hat = (x_t - sigma_t eps_hat) / alpha_t; needs alpha_t > 0."""
    c = c.like(x_t)
    return c.d_alpha_t * (x_t - c.sigma_t * eps_hat) / c.alpha_t + c.d_sigma_t * eps_hat


def score_from_velocity(u_t: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """Eq. (8): grad log p_t(x) = (1/sigma_t) (alpha_t u_t - d_alpha_t x) / (d_alpha_t sigma_t - alpha_t d_sigma_t).

    That is -eps_hat / sigma_t (Tweedie for the noise); for the linear path, -(x + (1 - t) u) / t.
    Valid for t in (0, 1]: the score of data without noise does not exist.
    """
    c = c.like(x_t)
    return (c.alpha_t * u_t - c.d_alpha_t * x_t) / (c.d_alpha_t * c.sigma_t - c.alpha_t * c.d_sigma_t) / c.sigma_t


def velocity_from_score(score: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """The inverse of Eq. (8): eps_hat = -sigma_t score, then velocity_from_eps_hat; needs alpha_t > 0."""
    return velocity_from_eps_hat(-_like(c.sigma_t, x_t) * score, x_t, c)


# -----------------------------------------------------------------------------------------------
# 3. Interpolant conversion (Sec. 4.3, Eqs. 10-11; [2]). Two paths of the same data are the same
#    process up to a time change and a scale: bar_x_s = c_s x_{t_s} where t_s matches the SNR,
#    rho(t_s) = bar_rho(s), and c_s = bar_sigma_s / sigma_{t_s}. Differentiating bar_x_s in s gives the
#    target-path velocity from the source-path model evaluated once at (bar_x / c_s, t_s).


@dataclass
class ConversionCoeffs:
    """The time change and scale that carry the source path onto the target path at target time s."""

    t_s: Tensor  # source time with the same SNR: rho(t_s) = bar_rho(s)     (Eq. 10)
    c_s: Tensor  # scale bar_sigma_s / sigma_{t_s}, so bar_x_s = c_s x_{t_s}  (Eq. 10)
    d_t_s: Tensor  # dt_s / ds                                             (Eq. 11)
    d_c_s: Tensor  # dc_s / ds                                             (Eq. 11)


def conversion_coeffs(s: Tensor, source: Interpolant, target: Interpolant) -> ConversionCoeffs:
    """Eqs. (10)-(11) of Kim et al. 2025: t_s, c_s and their s-derivatives for target time s (any shape).

    Valid where both SNRs are finite and reachable: s in (0, 1], and t_s <= 1 (a VP source cannot
    serve target SNRs below its own alpha_1 / sigma_1 = 0.0066, e.g. the linear path at s > 0.9935).
    """
    bar = target(s)
    t_s = source.snr_inverse(bar.alpha_t / bar.sigma_t)  # the SNR-matched time (Fig. 4 of the paper)
    src = source(t_s)
    c_s = bar.sigma_t / src.sigma_t
    # rho(t_s) = bar_rho(s) differentiated in s, with rho' = (d_alpha sigma - alpha d_sigma) / sigma^2
    d_t_s = (src.sigma_t**2 * (bar.sigma_t * bar.d_alpha_t - bar.alpha_t * bar.d_sigma_t)
             / (bar.sigma_t**2 * (src.sigma_t * src.d_alpha_t - src.alpha_t * src.d_sigma_t)))
    d_c_s = (src.sigma_t * bar.d_sigma_t - bar.sigma_t * src.d_sigma_t * d_t_s) / src.sigma_t**2
    return ConversionCoeffs(t_s, c_s, d_t_s, d_c_s)


def to_source(bar_x: Tensor, k: ConversionCoeffs) -> Tensor:
    """Eq. (10) inverted: the source-path point x_{t_s} = bar_x_s / c_s where the model is evaluated.
    k's fields have shape () or (B,) and are broadcast over bar_x (B, *shape)."""
    return bar_x / _like(k.c_s, bar_x)


def target_velocity(u: Tensor, bar_x: Tensor, k: ConversionCoeffs) -> Tensor:
    """Eq. (11): bar_u_s(bar_x) = (d_c_s / c_s) bar_x + c_s d_t_s u, from the source-path model's velocity
    u = u_{t_s}(bar_x / c_s). k's fields have shape () or (B,) and are broadcast over bar_x (B, *shape)."""
    c_s, d_c_s, d_t_s = _like(k.c_s, bar_x), _like(k.d_c_s, bar_x), _like(k.d_t_s, bar_x)
    return (d_c_s / c_s) * bar_x + c_s * d_t_s * u


def vp_conversion_halves(s: Tensor) -> tuple[Tensor, Tensor]:
    """The two halves of the Linear -> VP conversion as a Linear-SDE sampler sees them (Sec. 5 of the
    paper and its v5 Table 1 ablation). For a VP-time grid s_0 > ... > s_T = 0 (float64):

      t_i = t_{s_i}   the linear time of the same SNR (Eq. 10): the times the VP-SDE visits on the
                      model's own path ("timestep conversion"); t_T = 0;
      k_i             (1 / c_{s_i}) sqrt((s_i - s_{i+1}) / (t_i - t_{i+1})) for i < T: the factor by which
                      a Linear-SDE step from t_i scales g, so that its noise g k_i sqrt(t_i - t_{i+1}) is
                      the VP-SDE's noise g sqrt(s_i - s_{i+1}) carried to the linear path (x = bar_x / c_s)
                      ("diffusion scaling"; large where the VP path moves fast in SNR, i.e. early).

    A Linear-SDE on the times t_i with g scaled by k_i is the VP-SDE to first order in the step; either
    half alone is the paper's ablation. Returns t (T + 1,) and k (T,)."""
    conv = conversion_coeffs(s[:-1], LinearInterpolant(), VPInterpolant())  # s > 0: at s = 0 it is 0 / 0
    t = torch.cat([conv.t_s, torch.zeros_like(s[-1:])])
    return t, torch.sqrt((s[:-1] - s[1:]) / (t[:-1] - t[1:])) / conv.c_s


def convert_velocity(velocity: VelocityFn, source: Interpolant, target: Interpolant) -> VelocityFn:
    """Eq. (11): the velocity bar_u(bar_x, s) of the target path, from a model u(x, t) of the source path.

        bar_u_s(bar_x) = (d_c_s / c_s) bar_x + c_s d_t_s u_{t_s}(bar_x / c_s)

    Exactly one call of `velocity` per evaluation (one NFE). s is a (B,) tensor (or a scalar); the
    coefficients are computed in s's dtype and the model receives t_s (B,) in that dtype. Converting
    to the same path is the identity up to rounding.
    """

    def converted_velocity(bar_x: Tensor, s: Tensor | float) -> Tensor:
        s = s if isinstance(s, Tensor) else torch.as_tensor(s, dtype=bar_x.dtype, device=bar_x.device)
        k = conversion_coeffs(s, source, target)
        u = velocity(to_source(bar_x, k), k.t_s.expand(bar_x.shape[0]) if k.t_s.ndim == 0 else k.t_s)
        return target_velocity(u, bar_x, k)

    return converted_velocity


# -----------------------------------------------------------------------------------------------
# 4. The reverse SDE with the flow's marginals (Sec. 4.2, Eq. 7, App. B Prop. 1):
#        dx_t = f_t(x_t) dt + g_t dw,   f_t = u_t - (g_t^2 / 2) grad log p_t,   run from t = 1 to t = 0,
#    has the marginals p_t of the ODE dx_t = u_t dt (Eq. 6) for every g_t >= 0. The Euler-Maruyama
#    proposal (Eq. 9) is p(x_{t - dt} | x_t) = N(x_t - f_t dt, g_t^2 dt I).


@dataclass(frozen=True)
class DiffusionCoefficient:
    """g(t) >= 0 of Eq. (7), with the shapes of the official code's `get_sde_diffuse`.

    t is the time of the path being sampled (the VP time after a Linear -> VP conversion). The default
    is the paper's g = 3 t^2; kind "zero" turns every SDE step into an ODE step.
    """

    kind: str = "square"  # zero | constant | linear | square | sigma | sin | exp | tan | clipping
    norm: float = 3.0  # overall scale; "square" with norm 3 is the paper's g = 3 t^2 (App. F.1)
    interpolant: Interpolant | None = None  # needed by "sigma" only: g = norm * sigma_t
    exp_width: float = 0.1  # width of the "exp" bump at t = 1 (the code's exp_diff_coeff_sigma)

    def __post_init__(self):
        kinds = ("zero", "constant", "linear", "square", "sigma", "sin", "exp", "tan", "clipping")
        if self.kind not in kinds:
            raise ValueError(f"unknown diffusion coefficient {self.kind!r}; choose one of {kinds}")
        if self.kind == "sigma" and self.interpolant is None:
            raise ValueError("diffusion coefficient 'sigma' needs interpolant= (g = norm * sigma_t)")
        if self.norm < 0:
            raise ValueError(f"the diffusion norm must be >= 0, got {self.norm}")

    def __call__(self, t: Tensor) -> Tensor:
        t = _time(t)
        if self.kind == "zero":
            return torch.zeros_like(t)
        if self.kind == "constant":
            return torch.full_like(t, self.norm)
        if self.kind == "linear":
            return self.norm * t
        if self.kind == "square":
            return self.norm * t**2
        if self.kind == "sigma":
            return self.norm * self.interpolant(t).sigma_t
        if self.kind == "sin":
            return self.norm * torch.sin(0.5 * math.pi * t)
        if self.kind == "exp":
            return self.norm * torch.exp(-(((t - 1) / self.exp_width) ** 2))
        if self.kind == "tan":
            # the official definition caps the angle at 0.95 * pi / 2 so g stays finite (g(1) = 12.7 norm)
            return self.norm * torch.tan(0.5 * math.pi * t.clamp(0, 0.95))
        return self.norm * torch.clamp(2 * (t - 0.5), min=0)  # "clipping": zero on the data half


def sde_drift(u_t: Tensor, x_t: Tensor, c: Coeffs, g_t: Tensor | float) -> Tensor:
    """Eq. (7): f_t = u_t - (g_t^2 / 2) grad log p_t(x_t), with the score from the velocity by Eq. (8).

    t in (0, 1] (the score divides by sigma_t). g_t has shape (), (B,) or x's.
    """
    g_t = _like(g_t, x_t)
    return u_t - 0.5 * g_t**2 * score_from_velocity(u_t, x_t, c)


def guidance_factor(c: Coeffs, g_t: Tensor | float) -> Tensor:
    """eta_t + g_t^2 / 2: how much of a change of the score a reverse-SDE step takes, per unit of dt.

    The score enters the step twice: in the SDE correction of Eq. 7 (factor g_t^2 / 2) and inside u_t
    itself, since Eq. 8 solved for u reads u_t = (d_alpha_t / alpha_t) x - eta_t grad log p_t with
    eta_t = sigma_t d_sigma_t - sigma_t^2 d_alpha_t / alpha_t. So tilting the score by grad v / beta
    (Eq. 30, the DPS guidance) moves the step by guidance_factor * dt * grad v / beta, and that is the
    exact velocity and SDE of the tilted marginals p_t exp(v / beta) (exact for a Gaussian and a linear
    reward). At alpha_t = 0 (the linear path at t = 1) eta_t is infinite but x0_hat, hence grad v, does
    not depend on x: the factor is 0 there. Elementwise in the shape of c's fields and g_t.
    """
    alpha_t = c.alpha_t.clamp(min=torch.finfo(c.alpha_t.dtype).tiny)
    eta_t = torch.where(c.alpha_t > 0, c.sigma_t * c.d_sigma_t - c.sigma_t**2 * c.d_alpha_t / alpha_t, 0.0)
    return eta_t + 0.5 * g_t**2


def euler_step(x_t: Tensor, u_t: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """One Euler step of the probability-flow ODE, Eq. (6): x_{t_next} = x_t + (t_next - t) u_t, t_next < t."""
    return x_t + (_like(t_next, x_t) - _like(t, x_t)) * u_t


def euler_maruyama(x_t: Tensor, u_t: Tensor, c: Coeffs, g_t: Tensor | float, dt: Tensor | float,
                   noise: Tensor) -> Tensor:
    """Eq. (9) with its coefficients given: x_t - f_t dt + g_t sqrt(dt) z, f_t of Eq. (7) from u_t.

    c is the interpolant at the start time t, g_t = g(t), dt = t - t_next > 0; c's fields, g_t and dt
    have shape (), (B,) or x's. `euler_maruyama_step` computes them from times; search.py from its grid."""
    g_t, dt = _like(g_t, x_t), _like(dt, x_t)
    return x_t - sde_drift(u_t, x_t, c, g_t) * dt + g_t * torch.sqrt(dt) * noise


def euler_maruyama_step(x_t: Tensor, u_t: Tensor, t: Tensor | float, t_next: Tensor | float,
                        interpolant: Interpolant, g: Callable[[Tensor], Tensor],
                        generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """One draw from the proposal of Eq. (9) (Eq. 12 on a converted path), backward from t to t_next < t:

        x_{t_next} = x_t - f_t(x_t) dt + g_t sqrt(dt) z,   dt = t - t_next,   z ~ N(0, I) from `generator`

    u_t is the velocity at (x_t, t) on `interpolant`'s path; drift and g are evaluated at the start t,
    as in Alg. 1 of the paper and the official code. `noise` replaces z when given. Where g_t = 0 for
    the whole batch this is exactly `euler_step` and no noise is drawn (nor the score computed, so
    t = 0 is then allowed).
    """
    t = _time(t)
    dt = _like(t, x_t) - _like(t_next, x_t)  # (B, 1, ..., 1) or ()
    if torch.any(dt < 0):
        raise ValueError("euler_maruyama_step runs backward in time: need t_next <= t")
    g_t = _like(g(t), x_t)
    if not torch.any(g_t != 0):
        return euler_step(x_t, u_t, t, t_next)
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
    return euler_maruyama(x_t, u_t, interpolant(t), g_t, dt, noise)


# -----------------------------------------------------------------------------------------------
# 5. Time grids (descending from 1 to 0, float64)


def flux_shift(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
               base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """FLUX's resolution-dependent shift e^mu, mu linear in the image token count (BFL get_schedule)."""
    mu = base_shift + (image_seq_len - base_seq_len) * (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(mu)


def time_grid(num_steps: int, kind: str = "uniform", shift: float | None = None) -> Tensor:
    """The num_steps + 1 times 1 = t_0 > t_1 > ... > t_N = 0 of a sampler, as float64.

    kind "uniform": linspace(1, 0). kind "exp" (App. C, the official `time_schedule: exp`):
    t_new = sqrt(1 - (1 - t)^2) of the uniform grid, i.e. small steps near the noise where the
    reward of x0_hat changes fastest, large steps near the data. shift (FLUX, see `flux_shift`):
    t' = shift t / (1 + (shift - 1) t), applied last; shift > 1 spends more steps at high noise.
    """
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if kind == "exp":
        t = torch.sqrt(1 - (1 - t) ** 2)
    elif kind != "uniform":
        raise ValueError(f"unknown time grid {kind!r}; choose 'uniform' or 'exp'")
    if shift is not None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        t = shift * t / (1 + (shift - 1) * t)
    # both maps fix 0 and 1 exactly in exact arithmetic; pin the endpoints against 1-ulp rounding
    t[0], t[-1] = 1.0, 0.0
    return t


# -----------------------------------------------------------------------------------------------
# 6. The exact flow of a Gaussian mixture, p0 = sum_k w_k N(m_k, s_k^2 I). On any path,
#    p_t = sum_k w_k N(alpha_t m_k, v_k I) with v_k = alpha_t^2 s_k^2 + sigma_t^2. Given the component
#    k, (x0, eps, x_t) are jointly Gaussian, so with r_k = x_t - alpha_t m_k
#        E[x0 | x_t, k] = m_k + (alpha_t s_k^2 / v_k) r_k,   E[eps | x_t, k] = (sigma_t / v_k) r_k,
#    and every marginal quantity is the posterior-weighted sum over k.


@dataclass
class MixtureTerms:
    """Per-component terms of a Gaussian mixture at (x_t, t), shared by all GaussianMixtureFlow outputs."""

    c: Coeffs  # the interpolant at t, each field (B, 1, 1)
    log_joint: Tensor  # log w_k + log N(x_t; alpha_t m_k, v_k I), (B, K)
    resid: Tensor  # r_k = x_t - alpha_t m_k, (B, K, D)
    var: Tensor  # v_k = alpha_t^2 s_k^2 + sigma_t^2, (B, K, 1)
    means: Tensor  # m_k in x_t's dtype, (K, D)
    var0: Tensor  # s_k^2 in x_t's dtype, (1, K, 1)

    @property
    def posterior(self) -> Tensor:
        """P(k | x_t), (B, K, 1), normalised by logsumexp (stable far from every mode)."""
        return torch.softmax(self.log_joint, dim=-1)[..., None]


class GaussianMixtureFlow:
    """Exact velocity, score, x0_hat and posterior of a Gaussian-mixture data distribution on any path.

    means (K, D), stds (K,) (isotropic per component, > 0), weights (K,) (normalised here). x_t (B, D)
    and t (B,) or (); the outputs follow x_t's dtype. The velocity is defined on [0, 1] for the linear,
    polynomial and cosine paths and on (0, 1] for VP (its d_sigma_t is infinite at t = 0).
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, interpolant: Interpolant | None = None):
        means = torch.as_tensor(means)
        means = means if means.is_floating_point() else means.to(torch.get_default_dtype())
        stds, weights = torch.as_tensor(stds, dtype=means.dtype), torch.as_tensor(weights, dtype=means.dtype)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        K = means.shape[0]
        if stds.shape != (K,) or weights.shape != (K,):
            raise ValueError(f"stds and weights must have shape ({K},), got {tuple(stds.shape)} and "
                             f"{tuple(weights.shape)}")
        if not torch.all(stds > 0):
            raise ValueError("every component std must be > 0 (the data density must exist)")
        if torch.any(weights < 0) or not weights.sum() > 0:
            raise ValueError("weights must be >= 0 and not all zero")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()
        self.interpolant = interpolant if interpolant is not None else LinearInterpolant()

    def with_interpolant(self, interpolant: Interpolant) -> GaussianMixtureFlow:
        """The same data distribution on another path."""
        return GaussianMixtureFlow(self.means, self.stds, self.weights, interpolant)

    def terms(self, x_t: Tensor, t: Tensor | float) -> MixtureTerms:
        """The per-component Gaussian terms at (x_t (B, D), t (B,) or ())."""
        if x_t.ndim != 2 or x_t.shape[1] != self.means.shape[1]:
            raise ValueError(f"x_t must have shape (B, {self.means.shape[1]}), got {tuple(x_t.shape)}")
        B, D = x_t.shape
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(B)  # (B,)
        c = self.interpolant(t)
        c = Coeffs(*(a.reshape(B, 1, 1) for a in (c.alpha_t, c.sigma_t, c.d_alpha_t, c.d_sigma_t)))  # (B, 1, 1)
        means, var0 = self.means.to(x_t), (self.stds.to(x_t) ** 2)[None, :, None]  # (K, D), (1, K, 1)
        resid = x_t[:, None, :] - c.alpha_t * means[None]  # (B, K, D)
        var = c.alpha_t**2 * var0 + c.sigma_t**2  # (B, K, 1)
        log_lik = -0.5 * (resid**2 / var).sum(-1) - 0.5 * D * torch.log(2 * math.pi * var[..., 0])  # (B, K)
        log_joint = torch.log(self.weights.to(x_t))[None] + log_lik  # (B, K)
        return MixtureTerms(c, log_joint, resid, var, means, var0)

    def log_prob(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """log p_t(x_t), (B,), by logsumexp over components."""
        return torch.logsumexp(self.terms(x_t, t).log_joint, dim=-1)

    def posterior_weights(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """P(component k | x_t), (B, K); at t = 0 this classifies data points."""
        return self.terms(x_t, t).posterior[..., 0]

    def x0_hat(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """E[x0 | x_t], (B, D)."""
        m = self.terms(x_t, t)
        x0_k = m.means[None] + m.c.alpha_t * m.var0 / m.var * m.resid  # (B, K, D)
        return (m.posterior * x0_k).sum(1)

    def score(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """grad log p_t(x_t) = -sum_k P(k | x_t) r_k / v_k, (B, D); finite on all of [0, 1] here."""
        m = self.terms(x_t, t)
        return (m.posterior * (-m.resid / m.var)).sum(1)

    def velocity(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """u_t(x_t) = E[d_alpha_t x0 + d_sigma_t eps | x_t], (B, D): the exact marginal velocity."""
        m = self.terms(x_t, t)
        gain = (m.c.d_alpha_t * m.c.alpha_t * m.var0 + m.c.d_sigma_t * m.c.sigma_t) / m.var  # (B, K, 1)
        u_k = m.c.d_alpha_t * m.means[None] + gain * m.resid  # E[u | x_t, k], (B, K, D)
        return (m.posterior * u_k).sum(1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws x0 ~ p0, (n, D), in the dtype of `means`."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)  # (n, D)
        return self.means[k] + self.stds[k, None] * z
