"""moeflow.parallel: process groups, data and expert parallelism applied to a plain model."""
