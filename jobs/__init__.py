"""Code that runs on the cluster as Ray jobs: one readable recipe per method, each writing
its status, log lines and checkpoints to the SQL store through `jobs.reporting`."""
