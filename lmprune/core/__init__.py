"""Shared primitives below every stage: the architecture table (`arch`), neuron hooks (`hooks`),
model loading and saving (`models`), corpora (`data`), masks (`masks`), the training loop
(`training`), ablation effects (`ablation`), the settings stages share (`specs`), the
collected-statistics format (`stats_folder`), atomic files (`io`), errors and exit codes
(`errors`), config machinery and the stage spec (`config`), lineage (`lineage`), folder locks
(`lock`) and the module-map format (`module_map`). Nothing here imports a stage."""
