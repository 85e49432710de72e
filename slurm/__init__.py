"""sbatch templates (Jinja) for `moeflow slurm submit`, shipped as package data, and the local test cluster script."""
