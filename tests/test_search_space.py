"""Auto-FPN search space: supernet vs decoded modules, cost model, genotypes, decode rules."""
import json
from pathlib import Path

import pytest
import torch

from autofpn.search.cost import ResourceCost, count_cost, level_sizes
from autofpn.config import CHOICES
from autofpn.search.decode import DECODE_RULES, decode, decode_weights
from autofpn.models.genotype import GenotypeError, load_genotype, save_genotype, validate_genotype
from autofpn.models.auto_head import EDGE_PAIRS, AutoHead
from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.operations import HEAD_OPS, NECK_OPS
from autofpn.models.architecture import Architecture

REPO = Path(__file__).resolve().parents[1]
IN_CH = {"c2": 8, "c3": 12, "c4": 16, "c5": 24}
IN_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
NECK_CH, HEAD_CH = 8, 4


def backbone_feats(h=32, w=64, batch=1):
    return {k: torch.randn(batch, c, -(-h // IN_STRIDES[k]), -(-w // IN_STRIDES[k])) for k, c in IN_CH.items()}


def random_genotype(seed, rule="argmax"):
    """Decode strongly random architecture weights, so "none" wins on some links/edges."""
    g = torch.Generator().manual_seed(seed)
    neck_w = torch.softmax(2 * torch.randn(2, 16, len(NECK_OPS), generator=g), -1)
    head_w = torch.softmax(2 * torch.randn(2, 14, len(HEAD_OPS), generator=g), -1)
    return decode_weights(neck_w, head_w, (2, 3, 4, 5), rule)


def one_hot_neck(genotype, neck):
    """Weights that select the genotype's op on kept links and "none" elsewhere."""
    w = torch.zeros(neck.arch_shape)
    w[..., NECK_OPS.index("none")] = 1.0
    for k, links in enumerate(genotype["neck"]["layers"]):
        for l in links:
            idx = neck.link_pairs.index((l["from"], l["to"]))
            w[k, idx] = 0.0
            w[k, idx, NECK_OPS.index(l["op"])] = 1.0
    return w


def one_hot_head(genotype, head):
    w = torch.zeros(head.arch_shape)
    w[..., HEAD_OPS.index("none")] = 1.0
    for m, edges in enumerate(genotype["head"]["cells"]):
        for e in edges:
            idx = EDGE_PAIRS.index((e["input"], e["node"]))
            w[m, idx] = 0.0
            w[m, idx, HEAD_OPS.index(e["op"])] = 1.0
    return w


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_one_hot_neck_supernet_computes_the_decoded_neck(seed):
    torch.manual_seed(seed)
    genotype = random_genotype(seed)
    dropped = sum(16 - len(links) for links in genotype["neck"]["layers"])
    assert dropped > 0, "the test should cover links decoded as 'none'"
    supernet = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH)
    fixed = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=genotype)
    # a decoded neck's parameters are a subset of the supernet's under the same keys
    sup_state = supernet.state_dict()
    fixed.load_state_dict({k: sup_state[k] for k in fixed.state_dict()}, strict=True)
    assert n_params(fixed) < n_params(supernet)
    feats = backbone_feats()
    with torch.no_grad():
        out_sup = supernet(feats, one_hot_neck(genotype, supernet))
        out_fixed = fixed(feats)
    assert sorted(out_fixed) == ["p2", "p3", "p4", "p5", "p6"]
    assert fixed.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    for name in out_fixed:
        assert out_fixed[name].shape[1] == NECK_CH
        torch.testing.assert_close(out_sup[name], out_fixed[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed,readout,cell_size", [(0, "gap", 0), (1, "gap", 0), (0, "fc", 0), (1, "gap", 3),
                                                    (0, "fc", 4)])
def test_one_hot_head_supernet_computes_the_decoded_head(seed, readout, cell_size):
    torch.manual_seed(seed)
    genotype = random_genotype(seed)
    supernet = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, readout=readout, readout_dim=24, cell_size=cell_size)
    fixed = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype, readout=readout, readout_dim=24,
                     cell_size=cell_size)
    sup_state = supernet.state_dict()
    fixed.load_state_dict({k: sup_state[k] for k in fixed.state_dict()}, strict=True)
    x = torch.randn(5, NECK_CH, 7, 7)
    with torch.no_grad():
        out_sup = supernet(x, one_hot_head(genotype, supernet))
        out_fixed = fixed(x)
    assert out_fixed.shape == (5, fixed.out_channels) == (5, 4 * HEAD_CH if readout == "gap" else 24)
    torch.testing.assert_close(out_sup, out_fixed, rtol=1e-5, atol=1e-6)


def test_head_readout_fc_keeps_where_in_the_roi_a_feature_was():
    """readout "fc": flatten + Linear(4C * 7 * 7, readout_dim) + ReLU after the same cells; a
    spatially shuffled RoI gives the same global average but another fc readout."""
    genotype = random_genotype(0)
    gap = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype)
    fc = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype, readout="fc", readout_dim=24)
    fc.load_state_dict(gap.state_dict(), strict=False)
    extra = sum(p.numel() for p in fc.parameters()) - sum(p.numel() for p in gap.parameters())
    assert extra == 4 * HEAD_CH * 49 * 24 + 24
    gap.eval(), fc.eval()
    cells_out = {}
    fc.readout_fc.register_forward_hook(lambda m, args, out: cells_out.update(x=args[0]))
    with torch.no_grad():
        out = fc(torch.randn(3, NECK_CH, 7, 7))
        last = cells_out["x"].reshape(3, 4 * HEAD_CH, 7, 7)
        shuffled = last.flatten(2)[:, :, torch.randperm(49)].reshape_as(last)
        torch.testing.assert_close(out, torch.relu(fc.readout_fc(last.flatten(1))))
        torch.testing.assert_close(shuffled.mean((2, 3)), last.mean((2, 3)))
        assert not torch.allclose(fc.readout_fc(shuffled.flatten(1)), fc.readout_fc(last.flatten(1)))
    with pytest.raises(ValueError, match="readout must be 'gap' or 'fc'"):
        AutoHead(NECK_CH, 7, HEAD_CH, cells=2, readout="max")


def test_head_cell_size_runs_the_cells_on_average_pooled_rois():
    """cell_size S: the cells see the RoI features average-pooled to S x S, the fc readout reads
    4C * S * S features; a 7 x 7 RoI whose S x S pooled means agree gives the same head output
    however its pixels differ within each pooling window; S out of [0, 7] is refused."""
    genotype = random_genotype(1)
    full = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype, readout="fc", readout_dim=24)
    small = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype, readout="fc", readout_dim=24, cell_size=3)
    assert small.readout_fc.in_features == 4 * HEAD_CH * 9 and full.readout_fc.in_features == 4 * HEAD_CH * 49
    small.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("readout_fc.")},
                          strict=False)
    small.eval()
    seen = {}
    small.cells[0].register_forward_pre_hook(lambda m, args: seen.update(s0=args[0]))
    x = torch.randn(4, NECK_CH, 7, 7)
    with torch.no_grad():
        out = small(x)
        torch.testing.assert_close(seen["s0"], torch.nn.functional.adaptive_avg_pool2d(x, 3))
        # the 7 -> 3 adaptive windows are rows / columns [0:3], [2:5], [4:7]: pixels (0, 0) and
        # (1, 1) lie in window (0, 0) only, so moving mass between them keeps every pooled mean
        assert out.shape == (4, 24)
        x2 = x.clone()
        x2[:, :, 0, 0] += 1.0
        x2[:, :, 1, 1] -= 1.0
        torch.testing.assert_close(small(x2), out)
        assert not torch.allclose(full(x2), full(x))
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="cell_size must be in"):
            AutoHead(NECK_CH, 7, HEAD_CH, cells=2, cell_size=bad)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_head_pooling_matrix_is_adaptive_avg_pool(size):
    """The pooled head's [S, 7] matrix (ONNX exports it with a dynamic RoI count, unlike
    adaptive_avg_pool2d) averages adaptive_avg_pool2d's windows, overlapping or not."""
    from autofpn.models.auto_head import adaptive_pool_matrix
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    matrix = adaptive_pool_matrix(7, size, like=x)
    assert matrix.dtype == torch.float64
    torch.testing.assert_close(matrix @ x @ matrix.t(), torch.nn.functional.adaptive_avg_pool2d(x, size),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_supernet_runs_only_the_sampled_ops_and_computes_the_decoded_modules(seed):
    """search.mode gdas: at one-hot weights the supernet runs the chosen op of each link/edge and
    nothing else (not even the 1x1 conv of a link whose sample is "none"), and equals the
    decoded neck and head."""
    torch.manual_seed(seed)
    genotype = random_genotype(seed)
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, sampled=True)
    head = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, sampled=True)
    fixed_neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=genotype)
    fixed_head = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype)
    for sup, fixed in ((neck, fixed_neck), (head, fixed_head)):
        state = sup.state_dict()
        fixed.load_state_dict({k: state[k] for k in fixed.state_dict()}, strict=True)
    ran = {"neck": set(), "head": set()}
    for part, module in (("neck", neck), ("head", head)):
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Conv2d):
                sub.register_forward_hook(lambda mod, args, out, name=name, part=part: ran[part].add(name))
    feats, rois = backbone_feats(), torch.randn(5, NECK_CH, 7, 7)
    with torch.no_grad():
        out_neck = neck(feats, one_hot_neck(genotype, neck))
        out_head = head(rois, one_hot_head(genotype, head))
    convs = lambda m: {n for n, sub in m.named_modules() if isinstance(sub, torch.nn.Conv2d)}  # noqa: E731
    assert ran["neck"] == convs(fixed_neck)
    # the head's edges; its cells' input projections run in the supernet even where no edge reads them
    not_pre = lambda names: {n for n in names if ".pre" not in n}  # noqa: E731
    assert not_pre(ran["head"]) == not_pre(convs(fixed_head))
    out_fixed = fixed_neck(feats)
    for name in out_fixed:
        torch.testing.assert_close(out_neck[name], out_fixed[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_head, fixed_head(rois), rtol=1e-5, atol=1e-6)


def test_sampled_supernet_fills_a_level_no_link_reaches_with_zeros():
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, sampled=True)
    w = torch.zeros(neck.arch_shape)
    w[..., NECK_OPS.index("none")] = 1.0  # every link sampled "none"
    out = neck(backbone_feats(), w)
    assert all(float(v.abs().sum()) == 0.0 for v in out.values())
    assert out["p2"].shape == (1, NECK_CH, 8, 16)
    head = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, sampled=True)
    w = torch.zeros(head.arch_shape)
    w[..., HEAD_OPS.index("none")] = 1.0
    assert head(torch.randn(3, NECK_CH, 7, 7), w).abs().sum() == 0


def test_cost_of_decoded_genotype_matches_the_built_modules():
    supernet_neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH)
    supernet_head = AutoHead(NECK_CH, 7, HEAD_CH, cells=2)
    tables = ResourceCost(supernet_neck, supernet_head, image_size=(64, 96), num_rois=10)
    for seed in range(3):
        genotype = random_genotype(seed)
        decoded = tables.decoded_cost(genotype)
        neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=genotype)
        head = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype)
        assert decoded["neck"].params == n_params(neck)
        assert decoded["head"].params == n_params(head)
        # the tables of the built modules themselves give the same params / FLOPs / MAC
        exact = ResourceCost(neck, head, image_size=(64, 96), num_rois=10).total()
        assert exact == decoded
    # and a supernet's exact cost counts what it holds: each link's 1x1 conv once, every op
    assert tables.total()["neck"].params == n_params(supernet_neck)
    assert tables.total()["head"].params == n_params(supernet_head)


def test_head_cost_tables_count_the_cells_at_cell_size():
    """With cell_size 3 the penalty's tables count each op on 3 x 3 RoIs: the decoded head's
    table cost is what the built head computes on 7 x 7 RoIs (the pooling is free), which is the
    unpooled head's cost on 3 x 3 RoIs."""
    tables = ResourceCost(head=AutoHead(NECK_CH, 7, HEAD_CH, cells=2, cell_size=3), num_rois=10)
    for seed in range(2):
        genotype = random_genotype(seed)
        decoded = tables.decoded_cost(genotype)["head"]
        pooled = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype, cell_size=3)
        unpooled = AutoHead(NECK_CH, 7, HEAD_CH, cells=2, genotype=genotype)
        assert decoded.flops == count_cost(pooled, torch.randn(10, NECK_CH, 7, 7)).flops
        assert decoded.flops == count_cost(unpooled, torch.randn(10, NECK_CH, 3, 3)).flops
        assert decoded.params == n_params(pooled)
        assert decoded.flops < ResourceCost(head=unpooled, num_rois=10).total()["head"].flops * 10 / 49


def test_flops_by_hand_for_an_identity_neck():
    """Identity links: FLOPs are the 1x1 input projections plus one 1x1 conv per link."""
    links = [{"from": lv, "to": lv, "op": "identity"} for lv in (2, 3, 4, 5)]
    genotype = {"version": 1, "neck": {"levels": [2, 3, 4, 5], "layers": [links, links]}, "head": None}
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=genotype)
    cost = ResourceCost(neck, image_size=(60, 90)).total()["neck"]
    sizes = level_sizes((60, 90), (2, 3, 4, 5))  # padded to 64 x 96
    assert sizes[2] == (16, 24) and sizes[5] == (2, 3)
    hw = {lv: sizes[lv][0] * sizes[lv][1] for lv in sizes}
    multiply_adds = sum(IN_CH[f"c{lv}"] * NECK_CH * hw[lv] + 2 * NECK_CH * NECK_CH * hw[lv] for lv in hw)
    assert cost.flops == 2 * multiply_adds  # a multiply-add = 2 FLOPs, as everywhere in the project
    assert cost.params == n_params(neck)


def test_expected_cost_is_linear_and_reaches_the_architecture():
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH)
    head = AutoHead(NECK_CH, 7, HEAD_CH, cells=2)
    arch = Architecture(neck.arch_shape, head.arch_shape)
    assert arch.alpha.abs().max() < 0.01 and arch.beta.abs().max() < 0.01  # DARTS init
    torch.testing.assert_close(arch.neck_weights().sum(-1), torch.ones(neck.arch_shape[:-1]))
    cost = ResourceCost(neck, head, image_size=(64, 96), num_rois=10)
    c = cost.expected_cost(arch.neck_weights(), arch.head_weights())
    c.backward()
    assert arch.alpha.grad.abs().sum() > 0 and arch.beta.grad.abs().sum() > 0
    # linear in the weights
    w1, w2 = torch.rand(neck.arch_shape), torch.rand(neck.arch_shape)
    mix = cost.expected_cost(0.3 * w1 + 0.7 * w2)
    torch.testing.assert_close(mix, 0.3 * cost.expected_cost(w1) + 0.7 * cost.expected_cost(w2))
    # "none" is free, the most expensive decodable neck costs exactly 3 (params + FLOPs + MAC = 1 each)
    none_only = torch.zeros(neck.arch_shape)
    none_only[..., 0] = 1
    assert cost.expected_cost(none_only).item() == 0.0
    heaviest = torch.nn.functional.one_hot(cost.neck_table[..., 0].argmax(-1), len(NECK_OPS)).double()
    assert cost.expected_cost(heaviest).item() <= 3.0 + 1e-9
    # one-hot weights of a genotype give its decoded (un-normalized) neck cost
    genotype = random_genotype(0)
    assert cost.expected_raw(one_hot_neck(genotype, neck))["neck"] == pytest.approx(
        cost.decoded_cost(genotype)["neck"])
    with pytest.raises(ValueError, match="do not match"):
        cost.expected_cost(torch.rand(1, 16, len(NECK_OPS)))


def test_genotype_json_round_trip(tmp_path):
    genotype = random_genotype(3)
    genotype["name"] = "round-trip"
    path = tmp_path / "sub" / "g.json"
    save_genotype(genotype, str(path))
    assert load_genotype(str(path)) == genotype
    text = path.read_text()
    assert '"from": ' in text and text.count("\n") > 20  # one link per line, readable


@pytest.mark.parametrize("name", ["fpn", "panet", "ssd"])
def test_shipped_genotypes_build_and_run(name):
    genotype = load_genotype(str(REPO / "configs" / "genotypes" / f"{name}.json"))
    assert genotype["name"] == name and genotype["head"] is None
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=genotype, norm="gn")
    out = neck(backbone_feats(h=96, w=64, batch=1))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p2": (24, 16), "p3": (12, 8), "p4": (6, 4), "p5": (3, 2), "p6": (2, 1)}
    out["p2"].sum().backward()
    pairs = {(l["from"], l["to"]) for links in genotype["neck"]["layers"] for l in links}
    expected = {"ssd": {(i, i) for i in range(2, 6)},
                "fpn": {(j, i) for i in range(2, 6) for j in range(i, 6)},
                "panet": {(j, i) for i in range(2, 6) for j in range(2, 6)}}[name]
    assert pairs == expected
    # the neck part alone (as the detector passes it) builds the same module
    neck2 = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=genotype["neck"], norm="gn")
    assert list(neck2.state_dict()) == list(neck.state_dict())


def _write(tmp_path, g):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(g))
    return str(path)


def _valid():
    return random_genotype(0)


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g["neck"]["layers"][1][0].update(op="conv_7x7"), r"neck\.layers\[1\]\[0\]\.op: unknown op 'conv_7x7'"),
    (lambda g: g["neck"]["layers"][0][0].update(to=7), r"neck\.layers\[0\]\[0\]\.to: unknown level 7"),
    (lambda g: g["neck"]["layers"][0][0].update(op="none"), r"neck\.layers\[0\]\[0\]\.op: op 'none'"),
    (lambda g: g["neck"]["layers"][0].append(dict(g["neck"]["layers"][0][0])), r"neck\.layers\[0\]\[\d+\]: duplicate link"),
    (lambda g: g["neck"]["layers"].__setitem__(0, []), r"neck\.layers\[0\]: levels \[2, 3, 4, 5\] have no incoming link"),
    (lambda g: g["head"]["cells"][0][0].update(node=6), r"head\.cells\[0\]\[0\]\.node: node index 6 out of range 2\.\.5"),
    (lambda g: g["head"]["cells"][1][0].update(input=g["head"]["cells"][1][0]["node"]), r"head\.cells\[1\]\[0\]\.input: input index"),
    (lambda g: g["head"]["cells"][0][0].update(op="sep_conv_9x9"), r"head\.cells\[0\]\[0\]\.op: unknown op 'sep_conv_9x9'"),
    (lambda g: g["head"]["cells"][0][0].pop("op"), r"head\.cells\[0\]\[0\]: keys"),
    (lambda g: g.update(version=2), r"version: 2 is not supported"),
    (lambda g: g.update(nek=None), r"unknown keys \['nek'\]"),
])
def test_malformed_genotypes_name_the_entry_and_file(tmp_path, mutate, message):
    g = _valid()
    mutate(g)
    path = _write(tmp_path, g)
    with pytest.raises(GenotypeError, match=message) as err:
        load_genotype(path)
    assert str(err.value).startswith(path)
    with pytest.raises(GenotypeError, match=message):
        validate_genotype(g)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(GenotypeError, match="broken.json: invalid JSON"):
        load_genotype(str(path))
    with pytest.raises(GenotypeError, match="not found"):
        load_genotype(str(tmp_path / "missing.json"))


def test_decode_rules_treat_none_as_stated():
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH)
    head = AutoHead(NECK_CH, 7, HEAD_CH, cells=2)
    arch = Architecture(neck.arch_shape, head.arch_shape)
    with torch.no_grad():
        arch.alpha.zero_()
        arch.alpha[..., NECK_OPS.index("none")] = 5.0  # "none" wins everywhere ...
        arch.alpha[..., NECK_OPS.index("sep_conv_3x3")] = 1.0
        arch.alpha[0, neck.link_pairs.index((3, 2)), NECK_OPS.index("identity")] = 9.0  # ... but here
        arch.alpha[0, neck.link_pairs.index((4, 2)), NECK_OPS.index("dil_conv_3x3_r2")] = 4.0
        arch.beta.zero_()
        arch.beta[..., HEAD_OPS.index("conv_3x3")] = 1.0
    g = decode(arch, neck, head, rule="argmax")
    layer0 = {(l["from"], l["to"]): l["op"] for l in g["neck"]["layers"][0]}
    # P2 keeps its argmax link; P3..P5 lost all links to "none" and keep their strongest one
    assert layer0[(3, 2)] == "identity" and (4, 2) not in layer0
    assert sorted(t for _, t in layer0) == [2, 3, 4, 5]
    assert all(op == "sep_conv_3x3" for (s, t), op in layer0.items() if t != 2)
    assert len(g["head"]["cells"][0]) == 14  # beta: conv_3x3 beats "none" on every edge

    dense = decode(arch, neck, head, rule="argmax_nonnone")
    assert all(len(links) == 16 for links in dense["neck"]["layers"])
    dense0 = {(l["from"], l["to"]): l["op"] for l in dense["neck"]["layers"][0]}
    assert dense0[(4, 2)] == "dil_conv_3x3_r2" and dense0[(5, 5)] == "sep_conv_3x3"

    top2 = decode(arch, neck, head, rule="top2")
    top2_0 = {(l["from"], l["to"]) for l in top2["neck"]["layers"][0]}
    assert {(3, 2), (4, 2)} <= top2_0 and len(top2_0) == 8
    assert all(len(edges) == 8 for edges in top2["head"]["cells"])  # 2 inputs x 4 nodes
    with pytest.raises(ValueError, match="unknown decode rule"):
        decode(arch, neck, head, rule="best")
    assert CHOICES["search.decode_rule"] == DECODE_RULES  # the config accepts exactly these

    # argmax_head_noidentity: the neck as argmax (its identity link stays); in the head an edge
    # won by identity gets its next op, one whose runner-up is "none" is dropped
    with torch.no_grad():
        arch.beta[0, 0, HEAD_OPS.index("identity")] = 3.0  # next best: conv_3x3 (1.0)
        arch.beta[0, 1, HEAD_OPS.index("identity")] = 3.0
        arch.beta[0, 1, HEAD_OPS.index("none")] = 2.0  # next best: none -> dropped
    plain = decode(arch, neck, head, rule="argmax")
    assert sum(e["op"] == "identity" for e in plain["head"]["cells"][0]) == 2
    no_identity = decode(arch, neck, head, rule="argmax_head_noidentity")
    assert no_identity["neck"] == plain["neck"]
    cell0 = {(e["input"], e["node"]): e["op"] for e in no_identity["head"]["cells"][0]}
    assert "identity" not in cell0.values() and len(cell0) == 13
    assert cell0[EDGE_PAIRS[0]] == "conv_3x3" and EDGE_PAIRS[1] not in cell0

    # argmax_head_dropidentity: the neck as argmax; in the head an edge won by identity is dropped
    # like one won by "none"; a node whose every edge went keeps its strongest convolution edge
    with torch.no_grad():
        node2 = [i for i, (_, n) in enumerate(EDGE_PAIRS) if n == 2]
        arch.beta[1, node2, HEAD_OPS.index("identity")] = 3.0  # node 2 of cell 1: identity on all
        arch.beta[1, node2[1], HEAD_OPS.index("sep_conv_5x5")] = 2.0  # its strongest convolution
    dropped = decode(arch, neck, head, rule="argmax_head_dropidentity")
    assert dropped["neck"] == plain["neck"] and dropped["decode_rule"] == "argmax_head_dropidentity"
    cell0 = {(e["input"], e["node"]): e["op"] for e in dropped["head"]["cells"][0]}
    # edges 0 and 1 (node 2's only inputs) are dropped; node 2 keeps the first of its tied conv_3x3
    assert set(cell0.values()) == {"conv_3x3"} and len(cell0) == 13
    assert EDGE_PAIRS[0] in cell0 and EDGE_PAIRS[1] not in cell0
    cell1 = {(e["input"], e["node"]): e["op"] for e in dropped["head"]["cells"][1]}
    assert [(k, op) for (k, n), op in cell1.items() if n == 2] == [(EDGE_PAIRS[node2[1]][0], "sep_conv_5x5")]
    assert len(cell1) == 14 - len(node2) + 1


def test_decode_cli_from_checkpoint(tmp_path):
    from autofpn.search import decode as decode_module
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH)
    arch = Architecture(neck.arch_shape, None)
    ckpt = tmp_path / "search.pth"
    torch.save({"model": {f"arch.{k}": v for k, v in arch.state_dict().items()},
                "cfg": {"search": {"decode_rule": "argmax_nonnone"}, "model": {"neck": {"levels": [2, 3, 4, 5]}}}},
               ckpt)
    out = tmp_path / "g.json"
    decode_module.main(["--checkpoint", str(ckpt), "--out", str(out)])
    g = load_genotype(str(out))
    assert g["decode_rule"] == "argmax_nonnone" and g["head"] is None
    assert g == decode(arch, neck, None, rule="argmax_nonnone")


def test_wrong_weights_and_mismatched_genotypes_are_rejected():
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH)
    with pytest.raises(ValueError, match="needs weights of shape"):
        neck(backbone_feats())
    genotype = random_genotype(0)
    with pytest.raises(ValueError, match="layers"):
        AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, layers=3, genotype=genotype)
    with pytest.raises(ValueError, match="cells"):
        AutoHead(NECK_CH, 7, HEAD_CH, cells=1, genotype=genotype)
    with pytest.raises(GenotypeError, match="no head part"):
        AutoHead(NECK_CH, 7, HEAD_CH, genotype=load_genotype(str(REPO / "configs/genotypes/fpn.json")))


def test_diagram_renders_png_and_svg(tmp_path):
    from autofpn.viz.genotype_diagram import main as draw_main
    path = tmp_path / "g.json"
    save_genotype(random_genotype(2), str(path))
    draw_main([str(path), "--out", str(tmp_path / "g")])
    png, svg = (tmp_path / "g.png").read_bytes(), (tmp_path / "g.svg").read_text()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    assert "<svg" in svg
    assert any(label in svg for label in ("sep 3x3", "sep 5x5", "dil 3x3 r2", "conv 3x3"))  # op labels
    assert "RoI feats" in svg and "RoI feats 3x3" not in svg  # no config: the RoI size is unknown
    # under a config the head's input is labelled with the RoI size its cells see
    draw_main([str(path), "--out", str(tmp_path / "demo"), "--cfg", str(REPO / "configs/demo.yaml")])
    assert "RoI feats 3x3" in (tmp_path / "demo.svg").read_text()  # model.head.cell_size: 3
    draw_main([str(path), "--out", str(tmp_path / "paper"), "--cfg", str(REPO / "configs/voc.yaml")])
    assert "RoI feats 7x7" in (tmp_path / "paper.svg").read_text()  # cell_size 0: the pooler's 7 x 7


def test_decisiveness_of_uniform_one_hot_and_collapsed_weights():
    from autofpn.search.decode import DECISIVE_MARGIN, decisiveness, format_decisiveness
    uniform = torch.full((2, 16, len(NECK_OPS)), 1.0 / len(NECK_OPS))
    d = decisiveness(uniform, NECK_OPS)
    assert d["entropy"] == pytest.approx(1.0) and d["margin"] == pytest.approx(0.0, abs=1e-7)
    assert "WARNING" in format_decisiveness("neck", d)
    one_hot = torch.zeros(2, 14, len(HEAD_OPS))
    one_hot[..., HEAD_OPS.index("sep_conv_3x3")] = 1.0
    d = decisiveness(one_hot, HEAD_OPS)
    assert d["entropy"] == pytest.approx(0.0, abs=1e-6) and d["margin"] == pytest.approx(1.0)
    assert d["parameter_free"] == 0.0 and "WARNING" not in format_decisiveness("head", d)
    # a quarter of the rows won by identity, a quarter by none: half parameter-free
    w = torch.full((1, 8, len(NECK_OPS)), 0.1)
    w[0, :2, NECK_OPS.index("identity")] = 0.3
    w[0, 2:4, NECK_OPS.index("none")] = 0.3
    w[0, 4:, NECK_OPS.index("sep_conv_5x5")] = 0.3
    d = decisiveness(w / w.sum(-1, keepdim=True), NECK_OPS)
    assert d["parameter_free"] == pytest.approx(0.5) and d["none"] == pytest.approx(0.25)
    assert d["margin"] == pytest.approx(d["min_margin"]) and d["margin"] > DECISIVE_MARGIN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_decisiveness_of_cuda_weights_equals_the_cpu_figures():
    from autofpn.search.decode import decisiveness
    w = torch.softmax(torch.randn(2, 16, len(NECK_OPS), generator=torch.Generator().manual_seed(0)), -1)
    assert decisiveness(w.cuda(), NECK_OPS) == decisiveness(w, NECK_OPS)


def test_agreement_of_searches_is_the_correlation_of_their_weight_movements(tmp_path):
    from autofpn.search.agreement import agreement, main, weight_movement
    g = torch.Generator().manual_seed(0)
    start = torch.randn(2, 16, len(NECK_OPS), generator=g) * 1e-3
    step = torch.randn(2, 16, len(NECK_OPS), generator=g)

    def write(name, move):
        (tmp_path / name / "neck").mkdir(parents=True)
        records = [{"iter": 0, "alpha": torch.softmax(start, -1).tolist()},
                   {"iter": 30, "alpha": torch.softmax(start + move, -1).tolist()}]
        (tmp_path / name / "neck" / "arch_trajectory.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        return str(tmp_path / name)

    same = write("a", 0.05 * step)
    # the same movement plus a per-link constant (invisible to the softmax) and twice the size
    scaled = write("b", 0.1 * step + torch.randn(2, 16, 1, generator=g))
    opposite = write("c", -0.05 * step)
    moved = weight_movement(same)
    torch.testing.assert_close(moved, (0.05 * step - 0.05 * step.mean(-1, keepdim=True)).flatten().double(),
                               atol=1e-5, rtol=1e-4)
    result = agreement([same, scaled, opposite])
    assert result[(same, scaled)] == pytest.approx(1.0, abs=1e-6)
    assert result[(same, opposite)] == pytest.approx(-1.0, abs=1e-6)
    assert main([same, scaled]) == 0
    with pytest.raises(FileNotFoundError, match="arch_trajectory.jsonl not found"):
        weight_movement(str(tmp_path / "nothing"))


def test_agreement_parts_separate_op_type_per_link_convolutions_and_identity_vs_none():
    from autofpn.search.agreement import agreement_parts
    g = torch.Generator().manual_seed(0)
    rest = torch.randn(32, len(NECK_OPS), generator=g)
    rest = rest - rest.mean(dim=0, keepdim=True)  # no op-type part
    rest = rest - rest.mean(dim=1, keepdim=True)  # centred per link, as a movement is
    rest = rest - rest.mean(dim=0, keepdim=True)
    op_type = torch.zeros(32, len(NECK_OPS))
    op_type[:, NECK_OPS.index("identity")], op_type[:, NECK_OPS.index("none")] = 3.0, -3.0  # identity rises
    same = agreement_parts(rest, rest)
    assert same["total"] == pytest.approx(1.0) and same["per_row"] == pytest.approx(1.0)
    assert same["same_best_parametric"] == 1.0 and same["identity_vs_none"] == 1.0 and same["op_type"] < 1e-10
    # the same op-type effect on both, opposite per-link choices: they agree overall, not per link
    parts = agreement_parts(op_type + rest, op_type - rest)
    assert parts["total"] > 0.3 and parts["per_row"] == pytest.approx(-1.0, abs=1e-5)
    assert parts["op_type"] == pytest.approx(float((op_type ** 2).sum() / ((op_type + rest) ** 2).sum()), rel=1e-5)
    # ... and opposite choices among the convolutions, though identity against none agrees
    assert parts["among_parametric"] == pytest.approx(-1.0, abs=1e-5) and parts["same_best_parametric"] == 0.0
    assert parts["identity_vs_none"] == 1.0
    opposite = agreement_parts(rest, -rest)
    assert opposite["same_best_parametric"] == 0.0 and opposite["identity_vs_none"] == 0.0
    # a convolution favoured on every link by both is agreement on the choice among convolutions
    favoured = torch.zeros(32, len(NECK_OPS))
    favoured[:, NECK_OPS.index("sep_conv_3x3")] = 10.0
    assert agreement_parts(favoured + rest, favoured - rest)["same_best_parametric"] == 1.0


def test_cost_tables_count_flops_as_torch_flop_counter_does():
    """One FLOP convention everywhere: the search's cost tables (and the planner built on them)
    give a neck the FLOPs that torch's FlopCounterMode (count_flops: study, demo, evaluate.py)
    gives the same neck in the detector."""
    from autofpn.config import load_config
    from autofpn.models.detector import build_detector, count_flops
    genotype = load_genotype(str(Path(__file__).resolve().parents[1] / "configs" / "genotypes" / "panet.json"))
    cfg = load_config(None, ["model.num_classes=3", "model.backbone.name=resnet18", "model.backbone.weights=none",
                             "model.neck.type=auto", "model.neck.channels=16", "model.head.mlp_dim=32",
                             "model.transform.test_min_size=96", "model.transform.max_size=96"])
    model = build_detector(cfg, genotype)
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 96, 96))
    assert count_cost(model.neck, feats).flops == count_flops(model, 96, 96)["neck"] > 0
