"""Serving: the Model Registry's champions, the pyfunc model, `predict`."""
