"""amax_lightning: is activation maximization in a language model reproducible? Run the study, measure it."""

__version__ = "0.1.0"
