"""GroupIM group recommender (Sankar et al., SIGIR 2020) with sparse, fast training."""

__version__ = "0.3.0"
