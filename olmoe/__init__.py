"""olmoe: Mixture-of-Experts language-model pretraining in the line of OLMoE."""

__version__ = "0.1.0"
