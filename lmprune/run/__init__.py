"""`lmprune run RECIPE`: the recipe (`recipe`), its plan over the registered stages (`pipeline`),
the run report (`report`) and the runner it shares with `lmprune compare` (`runner`)."""
