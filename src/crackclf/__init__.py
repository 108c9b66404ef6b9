"""crackclf: train, evaluate and deploy concrete-crack image classifiers."""

import time

__version__ = "0.1.0"

#: When this process started using crackclf (monotonic clock): the zero of a run's wall-time budget
#: (:class:`crackclf.training.budget.TimeBudget`), so data preparation counts against it too.
PROCESS_STARTED = time.monotonic()
