"""The login-node launcher: validates a run and submits it to Slurm through submitit."""
