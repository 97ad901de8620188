"""Pyro models written by other people, ported small, to test pyro_lvm on code it did not shape.

Each module is a port of a file of the Pyro repository (https://github.com/pyro-ppl/pyro,
Copyright (c) 2017-2019 Uber Technologies, Inc., Apache License 2.0,
https://www.apache.org/licenses/LICENSE-2.0), in its original style: the authors' own
``nn.Module`` classes and model/guide functions, unchanged except where a module's
header says so. The adaptations are only what running offline on small data needs:
sizes become constructor arguments, and the data are scikit-learn's embedded digits
(:func:`pyro_lvm.data.load_digits`) or generated in the module.

===================  =====================================================================
module               ported from
===================  =====================================================================
``vae``              ``examples/vae/vae.py``
``dmm``              ``examples/dmm.py`` (and the mini-batch helpers of
                     ``pyro/contrib/examples/polyphonic_data_loader.py``)
``sparse_gamma_def`` ``examples/sparse_gamma_def.py``
``prodlda``          ``tutorial/source/prodlda.ipynb``
``ss_vae``           ``examples/vae/ss_vae_M2.py`` (and ``examples/vae/utils/custom_mlp.py``)
===================  =====================================================================

``wrappers`` is not a port: it holds the encoder adapters that
:class:`~pyro_lvm.infer.AmortizedLangevin` needs today to run on these models (see its
docstring); the tests and ``benchmarks/ald_vs_nuts.py`` use them.

Importable as ``outside_models`` from the tests (pytest puts ``tests/`` on ``sys.path``)
and from the benchmarks (which insert ``tests/`` themselves).
"""
