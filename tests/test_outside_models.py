"""Smoke tests: SVI runs on each port of a Pyro model written by others (tests/outside_models).

Each port trains a few steps with the inference its authors used; the loss is finite and
the parameters move. What pyro_lvm does on these models is tested and benchmarked
elsewhere (benchmarks/ald_vs_nuts.py, benchmarks/dmm_lae.py).
"""

import pyro
import pytest
import torch
from outside_models import dmm, prodlda, sparse_gamma_def, ss_vae, vae
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO, config_enumerate
from pyro.optim import Adam, ClippedAdam


def _run(svi: SVI, *args, steps: int = 3, **kwargs) -> list[float]:
    losses = [svi.step(*args, **kwargs) for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return losses


def _moved(before: dict[str, torch.Tensor]) -> bool:
    store = pyro.get_param_store()
    return all(not torch.equal(before[k], store[k]) for k in before)


def _snapshot() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys()}


def test_vae_example_trains_with_svi():
    x, _ = vae.digits()
    model = vae.VAE(z_dim=4, hidden_dim=32, input_dim=64)
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())
    _run(svi, x[:32], steps=1)
    before = _snapshot()
    _run(svi, x[:32])
    assert _moved(before)


@pytest.mark.parametrize("min_length", [None, 2], ids=["full", "ragged"])
def test_dmm_example_trains_with_svi_on_ragged_sequences(min_length):
    sequences, lengths = dmm.synthetic_sequences(8, T_max=5, input_dim=6, min_length=min_length)
    batch = dmm.get_mini_batch(torch.arange(8), sequences, lengths)
    model = dmm.DMM(input_dim=6, z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=12)
    optim = ClippedAdam({"lr": 3e-4, "clip_norm": 10.0})
    svi = SVI(model.model, model.guide, optim, loss=Trace_ELBO())
    _run(svi, *batch, steps=1)
    before = _snapshot()
    _run(svi, *batch, annealing_factor=0.5)
    assert _moved(before)
    if min_length is not None:
        assert not batch[2].all()  # ragged: some steps are masked


def test_sparse_gamma_def_example_trains_with_its_guide():
    x = sparse_gamma_def.synthetic_counts(10, image_size=12)
    model = sparse_gamma_def.SparseGammaDEF(4, 3, 2, image_size=12)
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-2}), loss=TraceMeanField_ELBO())
    _run(svi, x, steps=1)
    sparse_gamma_def.clip_params()
    before = _snapshot()
    _run(svi, x)
    assert _moved(before)


def test_prodlda_tutorial_trains_with_svi():
    docs = prodlda.synthetic_documents(16, vocab_size=12, num_topics=3)
    model = prodlda.ProdLDA(vocab_size=12, num_topics=3, hidden=10, dropout=0.2)
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-2}), loss=TraceMeanField_ELBO())
    _run(svi, docs, steps=1)
    before = _snapshot()
    _run(svi, docs)
    assert _moved(before)


def test_ss_vae_example_trains_with_enumeration_and_the_auxiliary_loss():
    x, y, _, _ = ss_vae.digits()
    model = ss_vae.SSVAE(
        input_size=64,
        z_dim=3,
        hidden_layers=(16,),
        config_enum="parallel",
        aux_loss_multiplier=10.0,
    )
    guide = config_enumerate(model.guide, "parallel", expand=True)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    optim = Adam({"lr": 1e-3})
    loss_basic = SVI(model.model, guide, optim, loss=elbo)
    loss_aux = SVI(model.model_classify, model.guide_classify, optim, loss=Trace_ELBO())
    _run(loss_basic, x[:16], y[:16], steps=1)  # supervised
    before = _snapshot()
    _run(loss_basic, x[16:32])  # unsupervised: y enumerated
    _run(loss_aux, x[:16], y[:16])
    assert _moved(before)
    assert model.classifier(x[:4]).sum(-1).eq(1).all()
