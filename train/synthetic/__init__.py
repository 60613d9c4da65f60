"""The synthetic chart task: the research recipe behind ``mmprm demo`` and ``mmprm pipeline``.

- ``task``: seeded problems (3x3 digit tables, bar charts) rendered as images, with an exact
  checker of every step (``Problem.first_error``);
- ``policy``: a seeded stochastic policy that writes their solutions with controlled errors;
- ``prm_init``: the task's tiny PRM, its tokenizer, and the drills and curricula that pretrain it
  (readings, arithmetic, step verification);
- ``pipeline``: annotate (MCTS) -> label -> train -> evaluate, and its presets.

Measured results: ``RESULTS.md`` beside this file.  The general training modules
(``mmprm_infer.train.mcts``, ``labels``, ``datasets``, ``trainer``, ...) never import this package:
the recipe converts its problems to ``mcts.AnnotationItem``s (``task.annotation_items``).
"""
