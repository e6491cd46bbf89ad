"""Analysis: Task 1 without TEST labels (new-script detectors, shift tools), ensembles."""
