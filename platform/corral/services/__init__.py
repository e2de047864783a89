"""Services hold the logic: they take plain arguments, raise domain errors from
`corral.errors`, and use stores and clients handed to their constructors."""
