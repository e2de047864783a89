"""Model serving: the catalog of models (models file, embedded default), the app of each
model kind, the Ray Serve deployer, and the resolver that turns a tenant's model name
into a Serve handle. The models service (`corral.services.models`) drives them."""
