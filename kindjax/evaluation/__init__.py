"""Scoring generated digits: a real-digits classifier and the Fréchet distance."""
from kindjax.evaluation.digits_evaluator import DigitsEvaluator
from kindjax.evaluation.frechet import feature_statistics, frechet_distance

__all__ = ["DigitsEvaluator", "feature_statistics", "frechet_distance"]
