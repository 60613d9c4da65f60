"""Step-error metrics: moved to ``mmprm_infer.evaluation.metrics`` (core, beside `mmprm eval`); kept
importable here for code written against the old path."""

from mmprm_infer.evaluation.metrics import first_error_index, step_error_f1, step_macro_f1

__all__ = ["first_error_index", "step_error_f1", "step_macro_f1"]
