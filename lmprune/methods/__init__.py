"""Published detoxification methods as stages, each measured on lmprune's protocol beside module
pruning: `profs` (ProFS, Uppaal et al.), `act` (Linear-AcT, Rodriguez et al.), `dpo` (DPO as Lee
et al. use it). Each module: its config class, `run(config)`, `STAGE` and `register`."""
