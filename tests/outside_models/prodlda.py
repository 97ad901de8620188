"""Port of Pyro's ProdLDA tutorial (``tutorial/source/prodlda.ipynb``).

Source: https://github.com/pyro-ppl/pyro/blob/dev/tutorial/source/prodlda.ipynb,
Copyright (c) 2017-2019 Uber Technologies, Inc., SPDX-License-Identifier: Apache-2.0.
Model: Srivastava, Sutton (2017), "Autoencoding variational inference for topic models".

``Encoder`` (softplus MLP, dropout, ``BatchNorm1d(affine=False)`` on both heads),
``Decoder`` (dropout, a bias-free topic matrix, ``BatchNorm1d``) and ``ProdLDA.model`` /
``ProdLDA.guide`` (a logistic-normal topic proportion ``logtheta`` per document, a
``Multinomial`` likelihood) are the tutorial's, comments included. Adapted for offline
use: the 20 newsgroups bag of words becomes :func:`synthetic_documents`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F


class Encoder(nn.Module):
    # Base class for the encoder net, used in the guide
    def __init__(self, vocab_size, num_topics, hidden, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)  # to avoid component collapse
        self.fc1 = nn.Linear(vocab_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fcmu = nn.Linear(hidden, num_topics)
        self.fclv = nn.Linear(hidden, num_topics)
        # NB: here we set `affine=False` to reduce the number of learning parameters
        # See https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm1d.html
        # for the effect of this flag in BatchNorm1d
        self.bnmu = nn.BatchNorm1d(num_topics, affine=False)  # to avoid component collapse
        self.bnlv = nn.BatchNorm1d(num_topics, affine=False)  # to avoid component collapse

    def forward(self, inputs):
        h = F.softplus(self.fc1(inputs))
        h = F.softplus(self.fc2(h))
        h = self.drop(h)
        # μ and Σ are the outputs
        logtheta_loc = self.bnmu(self.fcmu(h))
        logtheta_logvar = self.bnlv(self.fclv(h))
        logtheta_scale = (0.5 * logtheta_logvar).exp()  # Enforces positivity
        return logtheta_loc, logtheta_scale


class Decoder(nn.Module):
    # Base class for the decoder net, used in the model
    def __init__(self, vocab_size, num_topics, dropout):
        super().__init__()
        self.beta = nn.Linear(num_topics, vocab_size, bias=False)
        self.bn = nn.BatchNorm1d(vocab_size, affine=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, inputs):
        inputs = self.drop(inputs)
        # the output is σ(βθ)
        return F.softmax(self.bn(self.beta(inputs)), dim=1)


class ProdLDA(nn.Module):
    def __init__(self, vocab_size, num_topics, hidden, dropout):
        super().__init__()
        self.vocab_size = vocab_size
        self.num_topics = num_topics
        self.encoder = Encoder(vocab_size, num_topics, hidden, dropout)
        self.decoder = Decoder(vocab_size, num_topics, dropout)

    def model(self, docs):
        pyro.module("decoder", self.decoder)
        with pyro.plate("documents", docs.shape[0]):
            # Dirichlet prior 𝑝(𝜃|𝛼) is replaced by a logistic-normal distribution
            logtheta_loc = docs.new_zeros((docs.shape[0], self.num_topics))
            logtheta_scale = docs.new_ones((docs.shape[0], self.num_topics))
            logtheta = pyro.sample(
                "logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1)
            )
            theta = F.softmax(logtheta, -1)

            # conditional distribution of 𝑤𝑛 is defined as
            # 𝑤𝑛|𝛽,𝜃 ~ Categorical(𝜎(𝛽𝜃))
            count_param = self.decoder(theta)
            # Currently, PyTorch Multinomial requires `total_count` to be homogeneous.
            # Because the numbers of words across documents can vary,
            # we will use the maximum count accross documents here.
            # This does not affect the result because Multinomial.log_prob does
            # not require `total_count` to evaluate the log probability.
            total_count = int(docs.sum(-1).max())
            pyro.sample("obs", dist.Multinomial(total_count, count_param), obs=docs)

    def guide(self, docs):
        pyro.module("encoder", self.encoder)
        with pyro.plate("documents", docs.shape[0]):
            # Dirichlet prior 𝑝(𝜃|𝛼) is replaced by a logistic-normal distribution,
            # where μ and Σ are the encoder network outputs
            logtheta_loc, logtheta_scale = self.encoder(docs)
            pyro.sample("logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1))

    def beta(self):
        # beta matrix elements are the weights of the FC layer on the decoder
        return self.decoder.beta.weight.cpu().detach().T


def synthetic_documents(
    num_docs: int = 64, vocab_size: int = 20, num_topics: int = 3, *, seed: int = 0
) -> torch.Tensor:
    """Word counts ``(num_docs, vocab_size)`` from a small LDA: ``num_topics`` topics
    concentrated on disjoint blocks of the vocabulary, Dirichlet(0.3) topic proportions
    per document, 20-40 words per document."""
    topics = torch.full((num_topics, vocab_size), 0.05)
    block = vocab_size // num_topics
    for k in range(num_topics):
        topics[k, k * block : (k + 1) * block] = 1.0
    topics = topics / topics.sum(-1, keepdim=True)
    # torch's Dirichlet sampler takes no generator: seed the global RNG inside a fork,
    # so that making the data does not shift the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        props = torch.distributions.Dirichlet(torch.full((num_topics,), 0.3)).sample((num_docs,))
        lengths = torch.randint(20, 41, (num_docs,))
        docs = torch.stack(
            [
                torch.distributions.Multinomial(int(n), probs=p @ topics).sample()
                for n, p in zip(lengths, props)
            ]
        )
    return docs.to(torch.get_default_dtype())
