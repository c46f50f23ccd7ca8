"""DeepSpeed engines built from the job spec, checkpoints, and metrics."""
