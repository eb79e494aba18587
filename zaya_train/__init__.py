"""zaya-train: ZAYA1 co-design training, from pretraining to a Markovian-RSA RL cascade."""

__version__ = "0.1.0"
