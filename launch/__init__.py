"""moeflow.launch: the `moeflow` CLI, the trainer and the launchers (local, Slurm, Ray)."""
