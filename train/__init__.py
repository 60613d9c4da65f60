"""PRM training: MCTS annotation, labels, datasets, trainer (general); ``synthetic/``: the synthetic
chart task, the research recipe behind ``mmprm demo``, which the general modules never import."""
