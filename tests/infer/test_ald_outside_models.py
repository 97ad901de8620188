"""ALD with the kernel's defaults on Pyro models written by others, against NUTS.

The ports of ``tests/outside_models`` (Pyro's VAE example with its encoder as written,
Pyro's deep Markov model on ragged sequences) are trained briefly by SVI as their authors
do, then the posterior of a few rows is sampled by NUTS (the reference) and by
``MCMC(AmortizedLangevin(...))`` with no tuning. Per coordinate the posterior means are
compared by their z-score with the combined Monte Carlo standard errors
(:mod:`pyro_lvm.infer.mcse`); the largest :math:`|z|` over :math:`K` coordinates must stay
below the 1% Bonferroni bound :math:`\\Phi^{-1}(1 - 0.005/K)`, and the chain must mix
(its smallest ESS is a fixed fraction of the draws). ``benchmarks/ald_vs_nuts.py`` runs
the same comparison at the examples' sizes.
"""

import pyro
import pytest
import torch
from outside_models import dmm as D
from outside_models import vae as V
from outside_models.wrappers import DMMEncoder, UnmaskLatents, dmm_encoder_input
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from seeding import offset_seed

from pyro_lvm.infer import AmortizedLangevin
from pyro_lvm.infer.mcmc.checks import FlatPotentialWarning
from pyro_lvm.infer.mcse import compare_draws, max_z_threshold


def _run(kernel, args, draws: int, warmup: int, seed: int) -> dict[str, torch.Tensor]:
    pyro.set_rng_seed(offset_seed(seed))
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(*args)
    return {k: v.detach() for k, v in mcmc.get_samples().items()}


def _svi(model, guide, batches, lr: float) -> None:
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    for batch in batches:
        svi.step(*batch)


def test_pyro_vae_example_with_its_encoder_as_written_matches_nuts():
    pyro.clear_param_store()
    torch.manual_seed(offset_seed(0))
    x_train, x_test = V.digits()
    vae = V.VAE(z_dim=2, hidden_dim=32, input_dim=64)
    gen = torch.Generator().manual_seed(offset_seed(0))
    batches = [(x_train[torch.randperm(len(x_train), generator=gen)[:100]],) for _ in range(300)]
    _svi(vae.model, vae.guide, batches, lr=1e-2)
    x = x_test[:3]

    nuts = _run(NUTS(vae.model), (x,), draws=1000, warmup=300, seed=1)
    # the encoder returns (z_loc, z_scale): the chain is fc21, the layer behind z_loc
    kernel = AmortizedLangevin(vae.model, vae.encoder, latent_site="latent")
    ald = _run(kernel, (x,), draws=3000, warmup=500, seed=2)

    result = compare_draws(ald, nuts)
    assert result.num_coordinates == 6
    assert result.max_abs_z < max_z_threshold(6, 0.01), result.z
    assert result.min_ess_per_draw > 0.01, result.min_ess  # mixes with no tuning
    assert compare_draws(nuts, nuts).min_ess > 200  # the reference is itself reliable


def test_pyro_dmm_on_ragged_sequences_matches_nuts():
    pyro.clear_param_store()
    torch.manual_seed(offset_seed(0))
    T, input_dim = 3, 5
    seqs, lengths = D.synthetic_sequences(64, T, input_dim, min_length=2, seed=0)
    dmm = D.DMM(input_dim=input_dim, z_dim=2, emission_dim=8, transition_dim=8, rnn_dim=8)
    gen = torch.Generator().manual_seed(offset_seed(0))
    batches = [
        D.get_mini_batch(torch.randperm(64, generator=gen)[:16], seqs, lengths) for _ in range(200)
    ]
    _svi(dmm.model, dmm.guide, batches, lr=1e-2)
    test, _ = D.synthetic_sequences(3, T, input_dim, seed=1)
    test_lengths = torch.tensor([T, T, T - 1])
    test = test * (torch.arange(T) < test_lengths[:, None])[..., None]
    batch = D.get_mini_batch(torch.arange(3), test, test_lengths)
    mask = batch[2].bool()
    names = [f"z_{t}" for t in range(1, T + 1)]

    # the padding steps' latents are masked: NUTS gets their (proper) prior back, which
    # leaves the posterior of the real steps unchanged
    nuts = _run(NUTS(UnmaskLatents()(dmm.model)), batch, draws=600, warmup=200, seed=1)
    kernel = AmortizedLangevin(
        dmm.model, DMMEncoder(dmm, T), latent_site=names, encoder_input=dmm_encoder_input
    )
    # ALD moves the padding latents too, with nothing to hold them: it says so
    with pytest.warns(FlatPotentialWarning, match="z_3"):
        ald = _run(kernel, batch, draws=2000, warmup=300, seed=2)

    select = {n: mask[:, t, None] for t, n in enumerate(names)}
    result = compare_draws(ald, nuts, select=select)
    assert result.num_coordinates == 2 * int(mask.sum())
    assert result.max_abs_z < max_z_threshold(result.num_coordinates, 0.01), result.z
    assert result.min_ess_per_draw > 0.005, result.min_ess  # the MixingWarning's threshold
    assert compare_draws(nuts, nuts, select=select).min_ess > 150
