"""pyro_lvm's VAE against a hand-written PyTorch loop on the same modules, data order and
budget (docs/benchmarks.md, "VAE baseline strength"); prints one JSON line.

    python benchmarks/vae_baseline.py trace|mf|hand|handlv SEED EPOCHS [--dataset D --data-dir P]

``trace``: ``ModuleSVI`` + ``Trace_ELBO``; ``mf``: + ``TraceMeanField_ELBO`` (analytic KL);
``hand``: plain loop, analytic KL; ``handlv``: plain loop with the encoder scale read as
``exp(pre / 2)`` (initial scale 1) instead of ``softplus(pre)``.
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import torch

from pyro_lvm.experiments.build import setup_run
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.trainer import Trainer


def _log_variance_scale() -> None:
    from pyro_lvm.models import vae
    from pyro_lvm.models.nets import MLP

    def forward(self, x):
        loc, pre = MLP.forward(self, x).split(self.latent_dim, dim=-1)
        return loc, (0.5 * pre).exp()

    vae.GaussianEncoder.forward = forward  # this process only


def _hand_loop(vae, data, config) -> None:
    optim = torch.optim.Adam(vae.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        for idx in torch.randperm(data.num_train, generator=gen).split(config.batch_size):
            x = data.train_x[idx]
            loc, scale = vae.encoder(x)
            z = loc + scale * torch.randn_like(loc)
            kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum(-1)
            loss = (kl - vae.decode(z).log_prob(x)).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variant", choices=["trace", "mf", "hand", "handlv"])
    p.add_argument("seed", type=int)
    p.add_argument("epochs", type=int)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="data")
    args = p.parse_args(argv)
    if args.variant == "handlv":
        _log_variance_scale()
    config = TrainConfig(
        model="vae", seed=args.seed, epochs=args.epochs, dataset=args.dataset,
        data_dir=args.data_dir, likelihood="logistic", layer_norm=True, orthogonal_init=True,
        depth=3, latent_dim=8, analytic_kl=args.variant == "mf",
    )  # fmt: skip
    experiment, data = setup_run(config)
    t0 = time.perf_counter()
    if args.variant in ("trace", "mf"):
        Trainer(experiment, data, config.batch_size, None, config.seed).fit(config.epochs)
    else:
        _hand_loop(experiment.lvm, data, config)
    seconds = time.perf_counter() - t0
    pyro.set_rng_seed(1000 + args.seed)
    metrics = evaluate(experiment, data.test_x, eval_samples=1000)
    row = dict(
        variant=args.variant, seed=args.seed, epochs=args.epochs, seconds=round(seconds, 1),
        test_nelbo_per_dim=metrics["test_nelbo_per_dim"], test_nll=metrics["test_nll"],
    )  # fmt: skip
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
