"""Model serving: the catalog of models (models file, embedded default, registered
checkpoints), the Ray Serve deployer, and the registry that ties them to tenants."""
