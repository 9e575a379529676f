"""MLflow: the tracking store, the pyfunc generator model, registration and aliases."""
