"""README "lmprune profs": the top ProFS direction at layer 20 of SmolLM2, with and without each
text's first token in its mean (100 ParaDetox pairs, seed 0):
    LMPRUNE_DATA_DIR=../shared/data python docs/results/profs_first_token.py"""

import torch

from lmprune.core.data import load_pairs
from lmprune.core.models import load_model
from lmprune.methods.profs import sentence_embeddings, toxic_subspace

torch.set_num_threads(1)
loaded = load_model("smollm2-135m", dtype="float32")
pairs = load_pairs("paradetox").sample(100, 0)
tok = loaded.tokenizer
inv = torch.tensor([1 / len(tok(o).input_ids) - 1 / len(tok(c).input_ids)
                    for o, c in zip(pairs.offensive, pairs.clean, strict=True)])
for first in (True, False):
    off = sentence_embeddings(loaded.model, tok, pairs.offensive, [20], first_token=first)[0]
    cln = sentence_embeddings(loaded.model, tok, pairs.clean, [20], first_token=first)[0]
    u, values = toxic_subspace(off, cln, 2)
    top = u[:, 0]
    d = int(top.abs().argmax())
    proj = ((off - cln) / 2) @ top
    corr = torch.corrcoef(torch.stack([proj, inv]))[0, 1]
    print(f"first_token={first}: top dim {d} weight {float(top[d]**2):.2f}, corr with "
          f"1/len difference {float(corr):+.2f}, s1/s3 {float(values[0]/values[2]):.1f}")
