"""Search: the search space and budget, Optuna study mechanics, the step dispatcher, transfer."""
