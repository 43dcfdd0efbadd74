"""Random heads (one cell, uniform over the space's valid heads, random stream 1) at no more head
FLOPs than searched_middle_seed2's head in the search penalty's tables, each on that search's neck."""
import json, sys
sys.path.insert(0, ".")  # run from the repository root: python docs/study/demo_head_cs3_fc/diagnostics/heads_at_cost/draw_heads.py 4
from autofpn.config import load_config
from autofpn.search.differentiable import supernet_cost_tables
from autofpn.search.random_sample import random_genotype
D = "docs/study/demo_head_cs3_fc"
opts = "train.precise_bn_batches=0 model.head.cells=1 model.head.channels=16 model.head.cell_size=3 model.head.readout=fc".split()
cfg = load_config("configs/demo.yaml", opts)
tables = supernet_cost_tables(cfg)
s2 = json.load(open(f"{D}/searches/seed2/middle/geno.json"))
head_cost = lambda g: tables.decoded_cost(g)["head"].flops
budget = head_cost(s2)
kept, tried = [], 0
while len(kept) < int(sys.argv[1]):
    g = random_genotype(1, tried, cells=1)
    tried += 1
    if head_cost({**s2, "head": g["head"]}) <= budget:
        kept.append((tried - 1, g))
print(f"budget {budget/1e9:.4f} G; {len(kept)} of {tried} draws within it")
for i, g in kept:
    name = f"s2neck_rhead1_{i:02d}"
    out = {"version": s2["version"], "name": name,
           "description": f"searched_middle_seed2's neck with the head of random_genotype(1, {i}, cells=1), a draw within "
                          f"that search's head FLOPs (docs/STUDY.md section 54)", "neck": s2["neck"], "head": g["head"]}
    json.dump(out, open(f"{D}/diagnostics/heads_at_cost/{name}.json", "w"), indent=1)
    ops = [e["op"] for c in g["head"]["cells"] for e in c]
    print(name, f"{head_cost({**s2, 'head': g['head']})/1e9:.4f} G", len(ops), "edges, identity", ops.count("identity"), sorted(set(ops)))
