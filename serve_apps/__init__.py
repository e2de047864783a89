"""Ray Serve applications: plain classes plus a `build_app(config)` that applies
`serve.deployment(...).bind(...)`, so a Serve config's `import_path` can name it."""
