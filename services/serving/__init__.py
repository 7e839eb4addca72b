"""Ray Serve sampling: ``POST /v1/models/{name}/samples`` from the students in the model registry."""
