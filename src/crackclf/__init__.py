"""crackclf: train, evaluate and deploy concrete-crack image classifiers."""

__version__ = "0.1.0"
