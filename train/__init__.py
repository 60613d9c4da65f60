"""PRM training: MCTS annotation, datasets, trainer."""
