"""``pyro-lvm train custom --model-file PATH.py:NAME`` (or ``MODULE:NAME``): your own model.

``NAME`` is a callable ``NAME(config, data_dim, likelihood)`` (see
:class:`~pyro_lvm.experiments.config.TrainConfig` for ``config``; ``likelihood`` is the
:class:`~pyro_lvm.models.likelihoods.Likelihood` chosen by ``--likelihood``) returning
either

* an :class:`~pyro_lvm.experiments.recipes.base.Experiment` (any inference driver), or
* a model object following :class:`~pyro_lvm.experiments.protocol.TrainableModel`: an
  :class:`torch.nn.Module` with Pyro programs ``model(x)`` and ``guide(x)`` over a data
  plate; it is trained by SVI (:class:`~pyro_lvm.infer.ModuleSVI` with ``Trace_ELBO``,
  ``--lr``, ``--optimizer``, ``--clip-norm``), evaluated with its guide as proposal, and
  sampled with its ``generate(n)`` method when it has one.

Loading a file runs its code, so it happens only when the user names the file: a run's
``config.json`` records ``model_file`` but ``evaluate``, ``sample`` and
:func:`pyro_lvm.load_run` import it only when passed ``model_file`` again.

An exception raised by the user's code (a syntax error, a failed import, a ``build`` that
raises or has another signature) is their error, not pyro_lvm's: it becomes a one-line
:class:`ModelFileError` naming their file, line and message (:func:`user_code_error`),
chained to the original exception, whose full traceback the CLI prints when the
environment sets ``PYRO_LVM_TRACEBACK=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.protocol import TrainableModel, missing
from pyro_lvm.experiments.recipes.base import Experiment, Inference
from pyro_lvm.models.likelihoods import Likelihood

__all__ = [
    "TRACEBACK_VARIABLE",
    "ModelFileError",
    "build",
    "load_object",
    "user_code",
    "user_code_error",
]

#: the environment variable that makes the CLI print the full traceback of user code
TRACEBACK_VARIABLE = "PYRO_LVM_TRACEBACK"


class ModelFileError(ValueError):
    """An exception raised in the user's model file (one line; the original exception is
    its ``__cause__``)."""


def _user_file(spec: str) -> Path | None:
    """The source file of ``PATH.py:NAME`` or of ``MODULE:NAME`` (without importing it)."""
    source = spec.rpartition(":")[0]
    if source.endswith(".py"):
        return Path(source).expanduser().resolve()
    try:
        found = importlib.util.find_spec(source)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    return Path(origin).resolve() if origin and origin.endswith(".py") else None


def user_code_error(err: BaseException, spec: str) -> ModelFileError | None:
    """``err`` as a one-line :class:`ModelFileError` when it was raised in the file of
    ``spec`` (``PATH.py:NAME`` or ``MODULE:NAME``): ``FILE:LINE: Type: message``; ``None``
    when the file has no part in it."""
    if isinstance(err, ModelFileError):
        return err
    path = _user_file(spec)
    if path is None:
        return None
    line = None
    if isinstance(err, SyntaxError) and err.filename and Path(err.filename).resolve() == path:
        line, text = err.lineno, err.msg
    else:
        frames = [
            f
            for f in traceback.extract_tb(err.__traceback__)
            if not f.filename.startswith("<") and Path(f.filename).resolve() == path
        ]
        if not frames:
            return None
        line = frames[-1].lineno
        text = (str(err).strip().splitlines() or [""])[0]
    message = f"{type(err).__name__}: {text}" if text else type(err).__name__
    error = ModelFileError(
        f"{path}:{line}: {message} (an error in your model file; fix it there, or set "
        f"{TRACEBACK_VARIABLE}=1 for the full traceback)"
    )
    error.__cause__ = err
    return error


@contextmanager
def user_code(spec: str) -> Iterator[None]:
    """Run the block (which runs the code of ``spec``); an exception raised in that file
    leaves it as a one-line :class:`ModelFileError` (:func:`user_code_error`)."""
    try:
        yield
    except Exception as err:
        error = user_code_error(err, spec)
        if error is None or error is err:
            raise
        raise error from err


def load_object(spec: str):
    """The object ``NAME`` of ``path.py:NAME`` or ``module:NAME`` (one-line errors)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"--model-file {spec!r} must be PATH.py:NAME or MODULE:NAME (e.g. mymodel.py:build)"
        )
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model-file: no file {path}; pass PATH.py:NAME")
        module_name = f"pyro_lvm_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            with user_code(spec):
                module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
    else:
        try:
            with user_code(spec):
                module = importlib.import_module(source)
        except ModuleNotFoundError as err:  # the module itself, not one it imports
            raise ValueError(f"--model-file: cannot import {source!r} ({err})") from None
    if not hasattr(module, name):
        raise ValueError(f"--model-file: {source} has no {name!r}")
    return getattr(module, name)


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    if not config.model_file:
        raise ValueError("train custom needs --model-file PATH.py:NAME (your model's build)")
    factory = load_object(config.model_file)
    _check_signature(factory, config.model_file)
    with user_code(config.model_file):
        built = factory(config, data_dim, likelihood)
    if isinstance(built, Experiment):
        _check_experiment(built, config.model_file)
        return built
    lacking = missing(built, TrainableModel)
    if not isinstance(built, nn.Module) or "model" in lacking:
        raise ValueError(
            f"--model-file {config.model_file} returned {type(built).__name__}: it must return "
            "an Experiment or an nn.Module with model(x) and guide(x) methods"
        )
    if lacking:
        raise ValueError(
            f"--model-file {config.model_file}: the model has no {', '.join(lacking)}; add "
            "guide(x) or return an Experiment with another inference driver "
            "(pyro_lvm.experiments.protocol.TrainableModel)"
        )
    from pyro_lvm.experiments.recipes.vae import make_optimizer
    from pyro_lvm.infer import ModuleSVI

    svi = ModuleSVI(
        built.model,
        built.guide,
        make_optimizer(list(built.parameters()), config),
        clip_norm=config.clip_norm,
    )
    return Experiment(lvm=built, inference=svi, modules=built)


def _check_signature(factory, spec: str) -> None:
    if not callable(factory):
        raise ValueError(
            f"--model-file {spec}: {type(factory).__name__} object is not callable; name a "
            "function build(config, data_dim, likelihood)"
        )
    try:
        inspect.signature(factory).bind(None, None, None)
    except TypeError:
        raise ValueError(
            f"--model-file {spec}: its signature is {inspect.signature(factory)}, but it is "
            "called as NAME(config, data_dim, likelihood); give it those three parameters"
        ) from None
    except ValueError:  # builtins without a signature: called as they are
        pass


def _check_experiment(experiment: Experiment, spec: str) -> None:
    """One-line errors for an :class:`Experiment` the trainer could not use."""
    lacking = missing(experiment.inference, Inference)
    if lacking:
        raise ValueError(
            f"--model-file {spec} returned an Experiment whose inference "
            f"({type(experiment.inference).__name__}) has no {', '.join(lacking)}; pass an "
            "inference driver such as pyro_lvm.infer.ModuleSVI or LAE "
            "(pyro_lvm.experiments.recipes.base.Inference)"
        )
    if not isinstance(experiment.modules, nn.Module):
        raise ValueError(
            f"--model-file {spec} returned an Experiment whose modules are a "
            f"{type(experiment.modules).__name__}, not an nn.Module; pass the module(s) "
            "holding every trained parameter (nn.ModuleList for several)"
        )
