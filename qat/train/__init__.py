"""Training with Lightning, launched by Hydra: `preflight` checks a config in seconds, `run`
executes its command. Nothing is imported here, so `qat.train.preflight` stays light."""
