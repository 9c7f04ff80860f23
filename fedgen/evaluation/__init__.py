"""Utility evaluation: train on synthetic data, test on real data."""

from fedgen.evaluation.classifiers import MLP, ConvNet, classifiers
from fedgen.evaluation.downstream import Classifier, TrainOnSynthetic

__all__ = ["MLP", "Classifier", "ConvNet", "TrainOnSynthetic", "classifiers"]
