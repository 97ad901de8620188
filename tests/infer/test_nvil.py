"""TraceNVIL_ELBO against exact gradients of a model whose ELBO is enumerated exactly."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from bernoulli_toy import DATA, ToySBN, assert_unbiased, estimate_grads, exact_grad
from pyro.infer import SVI, TraceGraph_ELBO
from seeding import offset_seed
from torch import nn

from pyro_lvm.infer import ModuleSVI
from pyro_lvm.infer.baselines import (
    ConstantBaseline,
    NeuralBaseline,
    RunningAverageBaseline,
    SignalNormalization,
)
from pyro_lvm.infer.nvil import TraceNVIL_ELBO
from pyro_lvm.infer.tracegraph import DifferentiableTraceGraph_ELBO

PARTICLES, REPEATS = 10, 100
# 20 copies of each row: one step averages 20 * PARTICLES independent estimates per row
ROWS = DATA.repeat(20, 1)


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _baselines(kind, toy):
    sites = ["z1"] if toy.layers == 1 else ["z1", "z2"]
    make = {
        "none": lambda s: None,
        "constant": lambda s: ConstantBaseline(-6.0),
        "running": lambda s: RunningAverageBaseline(beta=0.8),
        "running_global": lambda s: RunningAverageBaseline(beta=0.8, per_datapoint=False),
        "neural": lambda s: NeuralBaseline(_net()),
        "neural_upstream": lambda s: (
            NeuralBaseline(nn.Sequential(nn.Linear(2, 1)).double(), input_site="z1")
            if s == "z2"
            else NeuralBaseline(_net())
        ),
        "combined": lambda s: [RunningAverageBaseline(beta=0.8), NeuralBaseline(_net())],
    }[kind]
    return {s: make(s) for s in sites if make(s) is not None}


def _estimator(toy, kind, **kw):
    return TraceNVIL_ELBO(
        num_particles=PARTICLES,
        vectorize_particles=True,
        max_plate_nesting=1,
        baselines=_baselines(kind, toy),
        **kw,
    )


def _fit_step(elbo):
    """Train learnable baselines between estimates (conditionally unbiased throughout)."""
    params = list(elbo.parameters())
    if not params:
        return None
    opt = torch.optim.Adam(params, lr=0.05)

    def step():
        opt.step()
        opt.zero_grad()

    return step


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "layers,kind",
    [
        (1, "none"),
        (1, "combined"),
        (2, "combined"),
        pytest.param(1, "constant", marks=SLOW),
        pytest.param(1, "running", marks=SLOW),
        pytest.param(1, "running_global", marks=SLOW),
        pytest.param(1, "neural", marks=SLOW),
        pytest.param(2, "none", marks=SLOW),
        pytest.param(2, "neural_upstream", marks=SLOW),
    ],
)
def test_gradient_unbiased(float64, layers, kind):
    toy = ToySBN(layers)
    exact = exact_grad(toy, lambda: toy.exact_elbo(ROWS))
    # with baselines, also check the cached dependency structure (and save time)
    elbo = _estimator(toy, kind, cache_dependencies=kind != "none")
    samples = estimate_grads(
        toy,
        lambda: elbo.differentiable_loss(toy.model, toy.guide, ROWS),
        REPEATS,
        after_step=_fit_step(elbo),
    )
    assert_unbiased(samples, exact)


@pytest.mark.parametrize("layers", [1, pytest.param(2, marks=SLOW)])
def test_reinforce_unbiased(float64, layers):
    toy = ToySBN(layers)
    exact = exact_grad(toy, lambda: toy.exact_elbo(ROWS))
    elbo = _estimator(toy, "none", rao_blackwellize=False)
    samples = estimate_grads(
        toy, lambda: elbo.differentiable_loss(toy.model, toy.guide, ROWS), REPEATS
    )
    assert_unbiased(samples, exact)


def test_subsample_scale_unbiased_and_signal_unscaled(float64):
    # 60 rows of a 200-row dataset: the minibatch ELBO is scaled by 200/60
    idx = torch.arange(60) * 3 + 1
    toy = ToySBN(1, num_data=200)
    exact = exact_grad(toy, lambda: toy.exact_elbo(ROWS, scale=200 / 60))
    elbo = _estimator(toy, "running", cache_dependencies=True)
    samples = estimate_grads(
        toy, lambda: elbo.differentiable_loss(toy.model, toy.guide, ROWS, idx), REPEATS
    )
    assert_unbiased(samples, exact)
    # the baseline target is the per-datapoint signal, not N/B times it
    averages = {}
    for num_data in (200, None):
        pyro.set_rng_seed(offset_seed(3))
        toy.num_data = num_data
        fresh = _estimator(toy, "running")
        fresh.differentiable_loss(toy.model, toy.guide, ROWS, idx)
        averages[num_data] = fresh.baselines["z1"][0].average[idx]
    assert torch.allclose(averages[200], averages[None])
    assert (averages[None] < 0).all()


def test_normalization_unbiased_for_the_rescaled_gradient(float64):
    toy = ToySBN(1)
    exact = exact_grad(toy, lambda: toy.exact_elbo(ROWS))
    norm = SignalNormalization(beta=0.8)
    elbo = TraceNVIL_ELBO(
        num_particles=PARTICLES,
        vectorize_particles=True,
        max_plate_nesting=1,
        baselines={"z1": [ConstantBaseline(-3.0), norm]},
        cache_dependencies=True,
    )
    for _ in range(20):  # warm the running variance, then freeze it
        elbo.differentiable_loss(toy.model, toy.guide, ROWS)
    elbo.eval()
    scale = float(norm.scale)
    assert scale > 1.0
    samples = estimate_grads(
        toy, lambda: elbo.differentiable_loss(toy.model, toy.guide, ROWS), REPEATS
    )
    num_guide = sum(p.numel() for p in toy.enc.parameters())
    offset = sum(p.numel() for p in toy.parameters()) - num_guide
    names = [n for n, _ in toy.named_parameters()]
    assert names[-2:] == ["enc.0", "enc.1"]  # the guide's parameters come last
    samples[:, offset:] *= scale  # the score-function part is divided by the scale
    assert_unbiased(samples, exact)


def _guide_variance(toy, elbo, repeats=60):
    samples = estimate_grads(
        toy, lambda: elbo.differentiable_loss(toy.model, toy.guide, ROWS), repeats
    )
    num_guide = sum(p.numel() for p in toy.enc.parameters())
    return samples[:, -num_guide:].var(0).sum()


@pytest.mark.parametrize(
    "kind", ["combined", pytest.param("running", marks=SLOW), pytest.param("neural", marks=SLOW)]
)
def test_baselines_reduce_variance(float64, kind):
    toy = ToySBN(1)
    plain = _guide_variance(toy, _estimator(toy, "none"))
    elbo = _estimator(toy, kind, cache_dependencies=True)
    step = _fit_step(elbo)
    for _ in range(60):  # warm the baselines
        toy.zero_grad()
        elbo.differentiable_loss(toy.model, toy.guide, ROWS).backward()
        if step is not None:
            step()
    elbo.eval()
    reduced = _guide_variance(toy, elbo)
    # variance estimates from 60 repeats are within ~40%; the true ratio is ~0.1-0.2
    assert reduced < 0.5 * plain, (float(reduced), float(plain))


def test_constant_baseline_changes_only_the_variance(float64):
    toy = ToySBN(1)
    a = _estimator(toy, "none")
    b = _estimator(toy, "constant")
    pyro.set_rng_seed(offset_seed(1))
    la = a.differentiable_loss(toy.model, toy.guide, ROWS)
    pyro.set_rng_seed(offset_seed(1))
    lb = b.differentiable_loss(toy.model, toy.guide, ROWS)
    assert torch.allclose(la, lb)  # the loss value is minus the ELBO either way
    assert torch.allclose(la, -toy.exact_elbo(ROWS), rtol=0.05)


def test_batch_size_may_change_between_steps(float64):
    toy = ToySBN(1, num_data=10)
    elbo = TraceNVIL_ELBO(max_plate_nesting=1, baselines={"z1": RunningAverageBaseline(10)})
    svi = ModuleSVI(toy.model, toy.guide, torch.optim.SGD(toy.parameters(), lr=1e-3), loss=elbo)
    for idx in ([0, 1, 2], [5, 9], [3]):
        x = DATA[: len(idx)]
        svi.step(x, torch.tensor(idx))
    seen = elbo.baselines["z1"][0].seen
    assert seen.tolist() == [True, True, True, True, False, True, False, False, False, True]


def test_running_average_grows_and_checkpoints(float64):
    toy = ToySBN(1)
    elbo = _estimator(toy, "combined")
    elbo.differentiable_loss(toy.model, toy.guide, DATA, torch.tensor([0, 11, 5]))
    state = elbo.state_dict()
    assert state["z1.0.average"].shape == (12,)
    other = _estimator(toy, "combined")
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_usable_with_pyro_svi(float64):
    toy = ToySBN(1)

    def model(x):
        pyro.module("toy", toy)
        toy.model(x)

    def guide(x):
        pyro.module("toy", toy)
        toy.guide(x)

    net = _net()
    elbo = TraceNVIL_ELBO(max_plate_nesting=1, baselines={"z1": NeuralBaseline(net)})
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    before = [p.detach().clone() for p in (*toy.parameters(), *net.parameters())]
    loss = svi.step(DATA)
    after = list(toy.parameters()) + list(net.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert isinstance(loss, float) and loss > 0


def test_tracegraph_adapter_matches_pyro(float64):
    toy = ToySBN(2)
    grads = []
    for loss in (TraceGraph_ELBO(), DifferentiableTraceGraph_ELBO()):
        toy.zero_grad()
        pyro.set_rng_seed(offset_seed(5))
        if isinstance(loss, DifferentiableTraceGraph_ELBO):
            loss.differentiable_loss(toy.model, toy.guide, DATA).backward()
        else:
            loss.loss_and_grads(toy.model, toy.guide, DATA)
        grads.append(torch.cat([p.grad.flatten() for p in toy.parameters()]))
    assert torch.allclose(grads[0], grads[1])


def test_baseline_on_reparameterizable_site_is_an_error():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    elbo = TraceNVIL_ELBO(baselines={"z": RunningAverageBaseline(4)})
    with pytest.raises(ValueError, match="reparameterizable"):
        elbo.differentiable_loss(model, guide, torch.zeros(3))
    elbo = TraceNVIL_ELBO(baselines={"w": RunningAverageBaseline(4)})
    with pytest.raises(ValueError, match="not a sample site"):
        elbo.differentiable_loss(model, guide, torch.zeros(3))


def test_bad_baseline_configuration():
    with pytest.raises(ValueError, match="map site names"):
        TraceNVIL_ELBO(baselines=[RunningAverageBaseline()])
    with pytest.raises(ValueError, match="must be a Baseline"):
        TraceNVIL_ELBO(baselines={"z": {"use_decaying_avg_baseline": True}})
    with pytest.raises(ValueError, match="beta"):
        RunningAverageBaseline(beta=1.0)


def test_running_average_index_out_of_range(float64):
    toy = ToySBN(1)
    elbo = TraceNVIL_ELBO(max_plate_nesting=1, baselines={"z1": RunningAverageBaseline(4)})
    with pytest.raises(ValueError, match="num_data=4"):
        elbo.differentiable_loss(toy.model, toy.guide, DATA, torch.tensor([0, 1, 7]))


def test_cached_dependencies_give_the_same_estimate(float64):
    toy = ToySBN(2)
    grads = []
    for cache in (False, True):
        elbo = TraceNVIL_ELBO(
            max_plate_nesting=1, baselines=_baselines("running", toy), cache_dependencies=cache
        )
        pyro.set_rng_seed(offset_seed(11))
        for _ in range(3):  # the first step finds the structure, the next ones reuse it
            toy.zero_grad()
            elbo.differentiable_loss(toy.model, toy.guide, DATA).backward()
        grads.append(torch.cat([p.grad.flatten() for p in toy.parameters()]))
    assert torch.allclose(grads[0], grads[1])
    assert len(elbo._dependencies) == 1


def _ss_model(x, y=None):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Bernoulli(x.new_tensor(0.5)), obs=y)
        z = pyro.sample("z", dist.Normal(x.new_tensor(0.0), 1.0))
        pyro.sample("x", dist.Normal(z + 2 * y, 1.0), obs=x)


class _SemiSupervisedGuide(nn.Module):
    """Samples ``y`` when unlabelled; labelled, observes it (``observe``) or skips it."""

    def __init__(self, observe: bool):
        super().__init__()
        self.observe = observe
        self.a = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(-0.4, dtype=torch.float64))

    def forward(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            q_y = dist.Bernoulli(logits=self.a * x)
            if y is None:
                y = pyro.sample("y", q_y)
            elif self.observe:
                pyro.sample("y", q_y, obs=y)
            pyro.sample("z", dist.Normal(self.b * x + y, 1.0))


@pytest.mark.parametrize("rao_blackwellize", [True, False], ids=["rb", "reinforce"])
@pytest.mark.parametrize("observe", [True, False], ids=["observed", "absent"])
def test_a_baseline_on_a_site_observed_in_labelled_batches_is_skipped_there(
    float64, observe, rao_blackwellize
):
    """Labelled, ``y`` is not drawn: no score term and no baseline, the gradient is Pyro's
    TraceGraph_ELBO's (pathwise through ``z`` only); unlabelled, the baseline applies."""
    x = torch.tensor([0.5, -1.0, 2.0])
    y = torch.tensor([1.0, 0.0, 1.0])
    grads = []
    baselines = {"y": RunningAverageBaseline(beta=0.8)}
    for loss in (
        TraceNVIL_ELBO(
            max_plate_nesting=1, baselines=baselines, rao_blackwellize=rao_blackwellize
        ),
        TraceGraph_ELBO(max_plate_nesting=1),
    ):
        guide = _SemiSupervisedGuide(observe)
        pyro.set_rng_seed(offset_seed(5))
        with warnings.catch_warnings():
            # Pyro's model/guide check counts a guide site observed by both as guide-only
            warnings.filterwarnings("ignore", "Found non-auxiliary vars in guide", UserWarning)
            loss.loss_and_grads(_ss_model, guide, x, y)
        grads.append(
            torch.stack([p.grad if p.grad is not None else 0 * p for p in (guide.a, guide.b)])
        )
    assert torch.allclose(*grads, atol=1e-12, rtol=0), grads
    elbo = TraceNVIL_ELBO(max_plate_nesting=1, baselines={"y": RunningAverageBaseline(beta=0.8)})
    guide = _SemiSupervisedGuide(observe)
    elbo.loss_and_grads(_ss_model, guide, x)
    assert guide.a.grad is not None and guide.a.grad != 0  # the score term of a drawn y
