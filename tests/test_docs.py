"""The Sphinx site builds without a single warning (API reference from docstrings), and
the tutorial's code runs as written."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pyro
import torch
from seeding import offset_seed

DOCS = Path(__file__).resolve().parents[1] / "docs"
# z-score bound for ESS-based standard errors of MCMC means (13 means: Bonferroni at 1e-3
# gives 3.9; the ESS estimate is itself noisy)
Z = 4.5


def test_docs_build_warning_free(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "html" / "api.html").exists()


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)


def _max_log_likelihood(x, latent_dim: int, sigma: float) -> float:
    """The largest mean log-likelihood of x ~ N(b, W W^T + sigma^2 I) over W and b
    (Tipping & Bishop 1999 with the noise fixed): the top ``latent_dim`` eigenvalues of
    the sample covariance keep their value (at least sigma^2), the others become sigma^2."""
    lam = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    c = torch.cat(
        [lam[:latent_dim].clamp(min=sigma**2), torch.full_like(lam[latent_dim:], sigma**2)]
    )
    return float(-0.5 * (len(lam) * math.log(2 * math.pi) + c.log().sum() + (lam / c).sum()))


def test_custom_models_tutorial_runs_and_its_results_hold():
    """Every python block of docs/custom_models.md, in order, in one namespace; then the
    results it claims: the ELBOs improve and stay below the exact log-likelihoods, LAE
    raises the exact log-likelihood, and the MCMC posterior means of the conjugate models
    are within Z ESS-based standard errors of the closed forms."""
    blocks = _python_blocks("custom_models.md")
    # the page seeds with 0; a seed sweep (pytest --base-seed) checks it on fresh draws
    assert "pyro.set_rng_seed(0)" in blocks[0]
    blocks[0] = blocks[0].replace("pyro.set_rng_seed(0)", f"pyro.set_rng_seed({offset_seed(0)})")
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "custom_models.md", "exec"), ns)  # noqa: S102
    # SVI: the ELBO climbs to within 0.5 nats of log p(x), never above it (MC noise ~0.02)
    best = _max_log_likelihood(ns["x"], ns["LATENT"], ns["SIGMA"])
    assert ns["svi_after"] > ns["svi_before"]
    assert ns["log_px"] - 0.5 < ns["svi_after"] < ns["log_px"] + 0.05
    assert ns["module_svi_after"] < best + 0.05
    assert ns["module_svi_after"] > ns["svi_after"] - 0.2
    # the prior logits are a pyro.param created in the model: ModuleSVI trained them
    assert not torch.equal(pyro.param("prior_logits").detach(), torch.zeros(ns["BITS"]))
    assert ns["sbn_after"] > ns["sbn_before"]
    assert ns["sbn_after"] < ns["sbn_log_px"] + 0.05
    # LAE raises the exact log-likelihood to within 0.5 nats of its maximum
    assert ns["lae_before"] < ns["lae_after"] <= best + 1e-4
    assert ns["lae_after"] > best - 0.5
    # MCMC against the closed-form posterior (Gaussian) and the Gamma posterior
    assert ns["z"].shape == (1000, 4, ns["LATENT"])
    assert ns["ess"].min() > 25  # enough for the ESS-based standard errors below
    assert (ns["mean_z_scores"].abs() < Z).all(), ns["mean_z_scores"]
    # the same with an encoder as Pyro's VAE example writes it, (loc, scale)
    assert ns["ess_vae"].min() > 25
    assert (ns["vae_z_scores"].abs() < Z).all(), ns["vae_z_scores"]
    assert (ns["rate"] > 0).all()
    assert (ns["rate_z_scores"].abs() < Z).all(), ns["rate_z_scores"]
    # Predictive drew new data (uncondition), one draw per posterior sample
    assert ns["x_rep"].shape == (200, 4, ns["D"])
    assert not torch.allclose(ns["x_rep"][0], ns["rows"])
