"""Utility evaluation: train on synthetic data, test on real data."""

from fedgen.evaluation.classifiers import MLP, ConvNet, classifiers
from fedgen.evaluation.downstream import Classifier, TrainOnSynthetic, evaluate_accuracy

__all__ = ["MLP", "Classifier", "ConvNet", "TrainOnSynthetic", "classifiers", "evaluate_accuracy"]
