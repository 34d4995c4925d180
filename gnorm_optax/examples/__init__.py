"""A worked example: small digit classifiers trained with gnorm_optax optimizers.

Modules:
    data: the scikit-learn digits data, symmetric label noise, mini-batches.
    models: Flax NNX ``MLP`` and ``CNN`` for 8x8x1 images.
    train: optimizer table, NNX train step and the command-line entry point
        ``python -m gnorm_optax.examples.train --method sam``.

Needs the ``examples`` extra (flax, scikit-learn, tqdm).
"""
