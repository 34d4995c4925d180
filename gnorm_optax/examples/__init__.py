"""Worked examples: image classifiers trained with gnorm_optax optimizers.

Modules:
    data: scikit-learn's digits (offline default), MNIST, Fashion-MNIST and
        CIFAR-10 through Hugging Face ``datasets``; label noise; mini-batches.
    models: Flax NNX ``MLP``, ``CNN``, ``ResNet`` (BatchNorm) and ``ViT``.
    train: the optimizer table, the NNX train step and the command
        ``python -m gnorm_optax.examples.train`` (SGD vs SAM vs GNP by default).
    data_parallel: data-parallel training on all visible devices
        (``python -m gnorm_optax.examples.data_parallel``).

Needs the ``examples`` extra (flax, scikit-learn, tqdm, matplotlib, datasets,
orbax-checkpoint).
"""
