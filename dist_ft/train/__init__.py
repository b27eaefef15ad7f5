"""Training: `run_training` (run.py) prepares and starts a `Trainer` (trainer.py), whose loop calls the step math
(step.py), the loss (loss.py), the optimizer factory (optim.py), the schedule (schedule.py), evaluation
(evaluation.py, scores.py) and the hooks around a step (hooks.py)."""
