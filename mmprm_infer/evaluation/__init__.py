"""Evaluating a PRM: step-error metrics, benchmark readers, Best-of-N curves, `mmprm eval`."""
