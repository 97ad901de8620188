"""Every score-function estimator over the model structures of Pyro's
``tests/infer/test_valid_models.py``: it matches the exact objective in expectation, or
refuses in one line.

Each row of ``CASES`` is a tiny model/guide pair (scalar Bernoulli latents, a few
datapoints) whose guide has at most 64 joint discrete states, so its objective is
computed exactly by brute-force enumeration of the guide (:func:`exact_elbo`,
:func:`exact_vimco_bound`); reparameterized sites in the ``mixed`` case are sampled inside
the enumeration, which keeps that reference unbiased. The objectives are

* ELBO estimators (``TraceGraph_ELBO``, ``TraceNVIL_ELBO``, REINFORCE, ``DisARM``):
  :math:`\\mathcal L = \\mathbb E_q[\\sum \\log p - \\sum \\log q]` over the scaled and
  masked log-densities, the quantity ``pyro.infer.TraceGraph_ELBO`` estimates (Pyro's own
  estimator is the control row that validates the reference);
* ``VIMCO``: the :math:`K`-sample bound :math:`\\sum_i s_i\\, \\mathbb E[\\log \\frac1K
  \\sum_k w_{ik}]`, per datapoint :math:`i` of the data plate with its scale :math:`s_i`,
  from the masked, unscaled log weights, plus the scaled log-densities of the observed
  sites outside the data plate (which depend on no latent): a different quantity from
  the ELBO (equal at :math:`K = 1`); where the datapoints are not independent (rows
  marked ``whole``) and for ``weights="program"``, the whole-program bound
  :math:`\\mathbb E[\\log \\frac1K \\sum_k w_k]` from the scaled and masked log weights
  (:func:`exact_program_bound`).

An estimator's mean loss and mean gradient over independent draws must be
within a Student-t multiple of their Monte Carlo standard error of the exact values
(family-wise error ``ALPHA`` per row, Bonferroni over its coordinates).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from scipy import stats
from seeding import offset_seed
from torch import nn

from pyro_lvm.infer import DisARM, TraceNVIL_ELBO
from pyro_lvm.infer.tracegraph import DifferentiableTraceGraph_ELBO
from pyro_lvm.infer.vimco import VIMCO

ALPHA = 1e-3
K = 2  # VIMCO particles
X = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64)
MASK = torch.tensor([True, False, True])
SCALES = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)


# -- the table ------------------------------------------------------------------------------
class Params(nn.Module):
    """The parameters of a case: ``theta`` (model) and ``phi`` (guide)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(offset_seed(100 + seed))
        self.theta = nn.Parameter(0.5 * torch.randn(4, generator=g))
        self.phi = nn.Parameter(0.5 * torch.randn(4, generator=g))


def _bern(logits):
    return dist.Bernoulli(logits=logits)


def _obs(name, z, p, x, **kw):
    """An observation depending on the latent ``z`` (and on ``theta``)."""
    return pyro.sample(name, dist.Normal(p.theta[1] + p.theta[2] * z, 1.0), obs=x, **kw)


def plate_case(p, *, size=3, subsample=None, model_wrap=None, guide_wrap=None, obs_mask=None):
    def model(x):
        with pyro.plate("data", size, subsample=subsample):
            with model_wrap() if model_wrap else _null():
                z = pyro.sample("z", _bern(p.theta[0].expand(x.shape)))
                likelihood = dist.Normal(p.theta[1] + p.theta[2] * z, 1.0)
                if obs_mask is not None:
                    likelihood = likelihood.mask(obs_mask)
                pyro.sample("x", likelihood, obs=x)

    def guide(x):
        with pyro.plate("data", size, subsample=subsample):
            with guide_wrap() if guide_wrap else _null():
                pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x))

    return model, guide


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def masked_latent_case(p, mask):
    """``z`` masked in model and guide, its observation not: z's density terms drop out,
    but its value still drives ``x`` (the score term must stay)."""

    def model(x):
        with pyro.plate("data", 3):
            with poutine.mask(mask=mask):
                z = pyro.sample("z", _bern(p.theta[0].expand(3)))
            _obs("x", z, p, x)

    def guide(x):
        with pyro.plate("data", 3), poutine.mask(mask=mask):
            pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x))

    return model, guide


def obs_scale_case(p):
    """A tempered likelihood: only the observation is scaled."""

    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", _bern(p.theta[0].expand(3)))
            with poutine.scale(scale=SCALES):
                _obs("x", z, p, x)

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x))

    return model, guide


def nested_case(p):
    """Datapoints at dim -2, a per-pixel latent and observation in a nested plate."""
    x2 = torch.stack([X[:2], X[1:]])  # (2 rows, 2 pixels)

    def model(x):
        with pyro.plate("data", 2, dim=-2):
            z = pyro.sample("z", _bern(p.theta[0].expand(2, 1)))
            with pyro.plate("pix", 2, dim=-1):
                y = pyro.sample("y", _bern(p.theta[3] * z - 0.5))
                pyro.sample("x", dist.Normal(p.theta[1] * y + p.theta[2] * z, 1.0), obs=x2)

    def guide(x):
        with pyro.plate("data", 2, dim=-2):
            z = pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x2.mean(-1, keepdim=True)))
            with pyro.plate("pix", 2, dim=-1):
                pyro.sample("y", _bern(p.phi[2] * x2 + p.phi[3] * z))

    return model, guide


def sibling_case(p):
    """The data plate and a sibling plate at dim -1 with its own latent."""

    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", _bern(p.theta[0].expand(3)))
            _obs("x", z, p, x)
        with pyro.plate("group", 2):
            w = pyro.sample("w", _bern(p.theta[3].expand(2)))
            _obs("y", w, p, x[:2])

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x))
        with pyro.plate("group", 2):
            pyro.sample("w", _bern(p.phi[2] + p.phi[3] * x[:2]))

    return model, guide


def sibling_equal_size_case(p):
    """The observations in a sibling plate of the data plate's size at dim -1: no
    estimator may pair its elements with the datapoints'."""

    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", _bern(p.theta[0].expand(3)))
        with pyro.plate("pix", 3):
            _obs("x", z, p, x)

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x))

    return model, guide


def sequential_case(p):
    def model(x):
        for i in pyro.plate("data", 3):
            z = pyro.sample(f"z_{i}", _bern(p.theta[0]))
            _obs(f"x_{i}", z, p, x[i])

    def guide(x):
        for i in pyro.plate("data", 3):
            pyro.sample(f"z_{i}", _bern(p.phi[0] + p.phi[1] * x[i]))

    return model, guide


def markov_case(p):
    def model(x):
        z = torch.tensor(0.0)
        for i in pyro.markov(range(3)):
            z = pyro.sample(f"z_{i}", _bern(p.theta[0] + p.theta[3] * z))
            _obs(f"x_{i}", z, p, x[i])

    def guide(x):
        z = torch.tensor(0.0)
        for i in pyro.markov(range(3)):
            z = pyro.sample(f"z_{i}", _bern(p.phi[0] + p.phi[1] * x[i] + p.phi[2] * z))

    return model, guide


def factor_case(p, where):
    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", _bern(p.theta[0].expand(3)))
            if where == "model":
                pyro.factor("f", p.theta[3] * z * x)
            _obs("x", z, p, x)

    def guide(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x))
            if where == "guide":
                pyro.factor("g", p.phi[2] * z + p.phi[3], has_rsample=True)

    return model, guide


def global_case(p):
    def model(x):
        w = pyro.sample("w", _bern(p.theta[3]))
        with pyro.plate("data", 3):
            z = pyro.sample("z", _bern(p.theta[0].expand(3)))
            _obs("x", z + w, p, x)

    def guide(x):
        pyro.sample("w", _bern(p.phi[2]))
        with pyro.plate("data", 3):
            pyro.sample("z", _bern(p.phi[0] + p.phi[1] * x))

    return model, guide


def global_conditioned_case(p):
    """A global site conditioned out of the model (the guide does not sample it)."""

    def model(x):
        pyro.sample("w", dist.Normal(p.theta[3], 1.0), obs=torch.tensor(0.4))
        plate_case(p)[0](x)

    return model, plate_case(p)[1]


def mixed_case(p):
    """A reparameterized Normal ``u`` upstream of a Bernoulli ``z`` in model and guide."""

    def model(x):
        with pyro.plate("data", 3):
            u = pyro.sample("u", dist.Normal(0.0, 1.0).expand([3]))
            z = pyro.sample("z", _bern(p.theta[0] + p.theta[3] * u))
            pyro.sample("x", dist.Normal(p.theta[1] * z + u, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 3):
            u = pyro.sample("u", dist.Normal(p.phi[2] * x, torch.nn.functional.softplus(p.phi[3])))
            pyro.sample("z", _bern(p.phi[0] + p.phi[1] * u))

    return model, guide


def no_latent_case(p):
    def model(x):
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(p.theta[1], 1.0), obs=x)

    def guide(x):
        pass

    return model, guide


def _scaled(case, scale):
    def build(p):
        model, guide = case(p)
        return poutine.scale(model, scale=scale), poutine.scale(guide, scale=scale)

    return build


def _masked(case, mask):
    def build(p):
        model, guide = case(p)
        return poutine.mask(model, mask=mask), poutine.mask(guide, mask=mask)

    return build


ONE_BERNOULLI = "exactly one factorized Bernoulli"
OUTSIDE = "inside the data plate"


@dataclass
class Case:
    build: object
    refuse: dict = field(default_factory=dict)  # estimator -> error regex
    whole: bool = False  # VIMCO's "auto" weights are whole-program weights


CASES = {
    "plate": Case(plate_case),
    "subsampled_plate": Case(lambda p: plate_case(p, size=6, subsample=torch.tensor([1, 4, 5]))),
    "nested_plates": Case(nested_case, {"disarm": ONE_BERNOULLI}),
    "sibling_plates": Case(sibling_case, {"disarm": ONE_BERNOULLI}, whole=True),
    "sibling_plates_equal_size": Case(sibling_equal_size_case, {"disarm": OUTSIDE}, whole=True),
    "sequential_plate": Case(sequential_case, {"disarm": ONE_BERNOULLI}, whole=True),
    "markov": Case(markov_case, {"disarm": ONE_BERNOULLI}, whole=True),
    "poutine_mask": Case(_masked(plate_case, MASK)),
    "fully_masked": Case(_masked(plate_case, False)),
    "obs_mask": Case(lambda p: plate_case(p, obs_mask=MASK)),
    "masked_latent_unmasked_obs": Case(lambda p: masked_latent_case(p, MASK)),
    "fully_masked_latent_unmasked_obs": Case(lambda p: masked_latent_case(p, False)),
    "scale_scalar": Case(_scaled(plate_case, 2.5)),
    "scale_per_datapoint": Case(_scaled(plate_case, SCALES)),
    "scale_observation_only": Case(obs_scale_case, whole=True),
    "factor_in_model": Case(lambda p: factor_case(p, "model")),
    "factor_in_guide": Case(lambda p: factor_case(p, "guide"), {"disarm": "observed guide"}),
    "global_latent": Case(global_case, {"disarm": ONE_BERNOULLI}, whole=True),
    "global_conditioned": Case(global_conditioned_case, {"disarm": OUTSIDE}),
    "mixed_reparameterized": Case(mixed_case, {"disarm": ONE_BERNOULLI}),
    "no_latents": Case(no_latent_case, {"disarm": ONE_BERNOULLI}),
}

# name -> (estimator, independent draws). The ELBO estimators average 8 vectorized
# particles per draw, which keeps each draw's distribution (a few discrete atoms) close
# enough to normal for the t-test; VIMCO's particles are its K, so it takes more draws.
ESTIMATORS = {
    "tracegraph": (
        lambda: DifferentiableTraceGraph_ELBO(
            num_particles=8, vectorize_particles=True, max_plate_nesting=2
        ),
        40,
    ),
    "nvil": (
        lambda: TraceNVIL_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=2),
        40,
    ),
    "reinforce": (
        lambda: TraceNVIL_ELBO(
            num_particles=8, vectorize_particles=True, max_plate_nesting=2, rao_blackwellize=False
        ),
        40,
    ),
    "disarm": (lambda: DisARM(), 100),
    "vimco": (lambda: VIMCO(num_particles=K, max_plate_nesting=2), 100),
    "vimco_program": (
        lambda: VIMCO(num_particles=K, max_plate_nesting=2, weights="program"),
        100,
    ),
}
REFERENCE_REPEATS = 40  # enumerations with a fresh draw of the reparameterized sites


# -- exact references by enumeration of the guide --------------------------------------------
def _latent_sites(guide, args):
    trace = poutine.trace(guide).get_trace(*args)
    out = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if getattr(site["fn"], "has_rsample", False):
            continue  # reparameterized: sampled inside the enumeration
        assert site["fn"].support is dist.constraints.boolean, name
        out.append((name, site["value"].shape))
    return out


def _states(guide, args):
    """Every joint value of the guide's discrete sites, as a list of dicts."""
    sites = _latent_sites(guide, args)
    sizes = [math.prod(shape) for _, shape in sites]
    for bits in itertools.product([0.0, 1.0], repeat=sum(sizes)):
        values, start = {}, 0
        for (name, shape), n in zip(sites, sizes):
            values[name] = torch.tensor(bits[start : start + n]).reshape(shape)
            start += n
        yield values


def _terms(model, guide, args, values):
    """log q of the discrete draw (unmasked, unscaled: how they are sampled) and the
    model and guide traces replayed on it."""
    guide_trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(*args)
    model = poutine.replay(poutine.condition(model, data=values), trace=guide_trace)
    model_trace = poutine.trace(model).get_trace(*args)
    log_q = sum(
        guide_trace.nodes[name]["fn"].log_prob(value).sum() for name, value in values.items()
    )
    return torch.as_tensor(log_q), model_trace, guide_trace


def _sites(trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def exact_elbo(model, guide, args) -> torch.Tensor:
    r""":math:`\sum_c q(c)\,[\sum \log p - \sum \log q]` over the guide's discrete states
    :math:`c`, each term scaled and masked as Pyro's ELBOs weigh it."""
    total = 0.0
    for values in _states(guide, args):
        log_q, model_trace, guide_trace = _terms(model, guide, args, values)
        elbo = 0.0
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for _, site in _sites(trace):
                lp = site["fn"].log_prob(site["value"])
                elbo = elbo + sign * scale_and_mask(lp, site["scale"], site["mask"]).sum()
        total = total + log_q.exp() * elbo
    return total


def _per_datapoint(site, t):
    frame = next(f for f in site["cond_indep_stack"] if f.name == "data")
    t = t.expand(site["fn"].batch_shape) if t.dim() < -frame.dim else t
    return t.movedim(frame.dim, 0).reshape(t.shape[frame.dim], -1).sum(-1)


def _datapoint_scale(site, lp):
    frame = next(f for f in site["cond_indep_stack"] if f.name == "data")
    s = torch.as_tensor(site["scale"], dtype=lp.dtype).expand(lp.shape)
    return s.movedim(frame.dim, 0).reshape(s.shape[frame.dim], -1)[:, 0]


def _in_data_plate(site):
    return any(f.name == "data" for f in site["cond_indep_stack"])


def _log_weights(model, guide, args):
    """Per-state log q ``(S,)``, per-datapoint masked log weights ``(S, B)``, the
    per-datapoint scale ``(B,)`` and the scaled log-densities outside the data plate
    (depending on no latent: the same in every state)."""
    log_qs, log_ws, scale = [], [], None
    for values in _states(guide, args):
        log_q, model_trace, guide_trace = _terms(model, guide, args, values)
        log_w = const = 0.0
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for _, site in _sites(trace):
                lp = site["fn"].log_prob(site["value"])
                if not _in_data_plate(site):
                    const = const + sign * scale_and_mask(lp, site["scale"], site["mask"]).sum()
                    continue
                lp = scale_and_mask(lp, 1.0, site["mask"])
                log_w = log_w + sign * _per_datapoint(site, lp)
                if scale is None:  # VIMCO refuses sites of one datapoint scaled unequally
                    scale = _datapoint_scale(site, lp)
        log_qs.append(log_q)
        log_ws.append(log_w)
    return torch.stack(log_qs), torch.stack(log_ws), scale, const


def exact_vimco_bound(model, guide, args, k: int = K) -> torch.Tensor:
    r""":math:`\sum_i s_i\,\mathbb E[\log \frac1K \sum_k w_{ik}] + c`, the particles
    drawn independently from the guide: all :math:`S^K` joint states, each particle's
    reparameterized sites from its own enumeration pass."""
    runs = [_log_weights(model, guide, args) for _ in range(k)]
    (log_q1, log_w1, scale, const), (log_q2, log_w2, _, _) = runs[0], runs[1]
    return (scale * _pair_bound(log_q1, log_w1, log_q2, log_w2, k)).sum() + const


def _pair_bound(log_q1, log_w1, log_q2, log_w2, k):
    r""":math:`\mathbb E[\log \frac12 (w_1 + w_2)]` over all pairs of states."""
    assert k == 2
    pair = torch.stack(torch.broadcast_tensors(log_w1[:, None], log_w2[None]))  # (2, S, S, ...)
    bound = pair.logsumexp(0) - math.log(k)
    weight = (log_q1[:, None] + log_q2[None]).exp()
    weight = weight.reshape(weight.shape + (1,) * (bound.dim() - 2))
    return (weight * bound).sum((0, 1))


def _program_log_weights(model, guide, args):
    """Per-state log q ``(S,)`` and whole-program log weights ``(S,)`` from the scaled
    and masked log-densities (RenyiELBO's weights)."""
    log_qs, log_ws = [], []
    for values in _states(guide, args):
        log_q, model_trace, guide_trace = _terms(model, guide, args, values)
        log_w = torch.zeros(())
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for _, site in _sites(trace):
                lp = site["fn"].log_prob(site["value"])
                log_w = log_w + sign * scale_and_mask(lp, site["scale"], site["mask"]).sum()
        log_qs.append(log_q)
        log_ws.append(log_w)
    return torch.stack(log_qs), torch.stack(log_ws)


def exact_program_bound(model, guide, args, k: int = K) -> torch.Tensor:
    r""":math:`\mathbb E[\log \frac1K \sum_k w_k]` with one weight per particle for the
    whole program, by enumeration as :func:`exact_vimco_bound`."""
    runs = [_program_log_weights(model, guide, args) for _ in range(k)]
    return _pair_bound(*runs[0], *runs[1], k)


# -- the test ------------------------------------------------------------------------------
def _grads(params):
    return torch.cat(
        [torch.zeros_like(q) if q.grad is None else q.grad for q in params.parameters()]
    )


def _sample(params, fn, repeats):
    """``repeats`` independent (value, gradient...) vectors of a scalar function."""
    out = []
    for _ in range(repeats):
        params.zero_grad()
        value = fn()
        if value.requires_grad:
            value.backward()
        out.append(torch.cat([value.detach().reshape(1), _grads(params)]))
    params.zero_grad()
    return torch.stack(out)


def _deterministic(model, guide):
    def has_rsample(fn):
        sites = poutine.trace(fn).get_trace(X).nodes.values()
        return any(s["type"] == "sample" and getattr(s["fn"], "has_rsample", False) for s in sites)

    return not has_rsample(guide)


def _assert_agree(samples, reference, label):
    """Means within a Bonferroni-corrected Student-t multiple of the combined MCSE."""
    m = samples.shape[1]
    t = float(stats.t.ppf(1 - ALPHA / (2 * m), samples.shape[0] - 1))
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    ref_mean, ref_se = (
        reference.mean(0),
        (reference.std(0) / math.sqrt(reference.shape[0]) if reference.shape[0] > 1 else 0.0),
    )
    err = (mean - ref_mean).abs()
    tol = t * torch.sqrt(se**2 + ref_se**2) + 1e-9 * (1 + ref_mean.abs())
    assert (err <= tol).all(), (
        f"{label}: |mean - exact| / tol = {(err / tol).max():.2f} (coordinate 0 is the loss); "
        f"mean {mean.tolist()}, exact {ref_mean.tolist()}"
    )


# "vimco_program" where "vimco" has per-datapoint weights (elsewhere they are the same)
PAIRS = [
    (case, estimator)
    for case in CASES
    for estimator in ESTIMATORS
    if not (estimator == "vimco_program" and CASES[case].whole)
]


@pytest.mark.parametrize("case,estimator", PAIRS)
def test_matches_the_exact_objective_or_refuses(float64, case, estimator):
    row = CASES[case]
    params = Params(seed=list(CASES).index(case))
    model, guide = row.build(params)
    make, repeats = ESTIMATORS[estimator]
    elbo = make()
    if estimator in row.refuse:
        with pytest.raises(ValueError, match=row.refuse[estimator]) as err:
            elbo.differentiable_loss(model, guide, X)
        assert "\n" not in str(err.value)
        return
    exact = exact_elbo
    if estimator == "vimco_program" or (estimator == "vimco" and row.whole):
        exact = exact_program_bound
    elif estimator == "vimco":
        exact = exact_vimco_bound
    pyro.set_rng_seed(offset_seed(1))
    reps = 1 if _deterministic(model, guide) else REFERENCE_REPEATS
    with pyro.validation_enabled(False):
        reference = _sample(params, lambda: -exact(model, guide, (X,)), reps)
    pyro.set_rng_seed(offset_seed(2))
    elbo.differentiable_loss(model, guide, X)  # one validated pass
    with pyro.validation_enabled(False):
        samples = _sample(params, lambda: elbo.differentiable_loss(model, guide, X), repeats)
    _assert_agree(samples, reference, f"{estimator} on {case}")
