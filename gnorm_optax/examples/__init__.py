"""Worked examples: classifiers trained with gnorm_optax optimizers.

Modules:
    data: scikit-learn's digits and MNIST-1D (both offline), label noise,
        mini-batches.
    hub: MNIST, Fashion-MNIST and CIFAR-10 from the Hugging Face Hub (the
        ``hub`` extra).
    models: Flax NNX ``MLP``, ``CNN``, ``CNN1D`` (1-D signals) and the
        registry ``MODELS``, which also holds ``resnet.ResNet`` (BatchNorm)
        and ``vit.ViT``.
    train: ``python -m gnorm_optax.examples.train``, one file to fork: the
        optimizer table, the NNX train step, evaluation and flatness.
    checkpointing: the same training, saved every epoch with orbax and
        resumed exactly (``python -m gnorm_optax.examples.checkpointing``).
    data_parallel: data-parallel training on all the devices of one or
        several processes (``python -m gnorm_optax.examples.data_parallel``;
        ``jax.distributed`` with ``--coordinator-address``,
        ``--num-processes`` and ``--process-id``, or ``--distributed``).
    distributed: its plumbing: ``jax.distributed``'s flags and start, and
        placing the state and each process's batch rows on the global mesh.

Needs the ``examples`` extra (flax, scikit-learn, mnist1d, tqdm,
orbax-checkpoint).
"""

import importlib.util

from gnorm_optax._src.optional import missing_extra

# Checked without importing them, so that `--help` stays fast.
for _name in ("flax", "sklearn", "tqdm", "orbax.checkpoint"):
  if importlib.util.find_spec(_name) is None:
    _error = ModuleNotFoundError(f"No module named {_name!r}", name=_name)
    raise missing_extra(_error, module="gnorm_optax.examples", extra="examples")
