"""The table and plot of README "Relearning attack" from the attack folders, read with
lmprune.finetune.relearn's own readers: python docs/results/relearn_table.py ATTACKS_DIR OUT.png"""

import sys
from pathlib import Path

from lmprune.finetune.relearn import attack_table, plot_attacks, read_attack

root = Path(sys.argv[1])
attacks = {folder.name: found for folder in sorted(root.iterdir())
           if folder.is_dir() and (found := read_attack(folder))}
print("\n".join(attack_table(attacks)))
plot_attacks(attacks, Path(sys.argv[2]))
