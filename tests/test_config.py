"""Config loading: base-file inheritance, command-line overrides, unknown-key errors, saving."""
from pathlib import Path

import pytest
import yaml

from autofpn.config import DEFAULTS, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_inheritance_chain_merges_child_over_base(tmp_path):
    _write(tmp_path / "base.yaml", {"solver": {"lr": 0.5, "epochs": 3},
                                     "model": {"neck": {"channels": 64}}})
    _write(tmp_path / "mid.yaml", {"_base_": "base.yaml", "solver": {"lr": 0.1}})
    child = _write(tmp_path / "child.yaml", {"_base_": "mid.yaml",
                                              "model": {"head": {"mlp_dim": 32}}})
    cfg = load_config(str(child))
    assert cfg["solver"]["lr"] == 0.1  # mid overrides base
    assert cfg["solver"]["epochs"] == 3  # from base
    assert cfg["model"]["neck"]["channels"] == 64  # from base, sibling keys untouched
    assert cfg["model"]["head"]["mlp_dim"] == 32
    assert cfg["model"]["neck"]["levels"] == DEFAULTS["model"]["neck"]["levels"]  # default
    assert DEFAULTS["solver"]["lr"] == 0.02  # the defaults are not mutated


def test_overrides_parse_yaml_values_and_apply_last(tmp_path):
    path = _write(tmp_path / "c.yaml", {"solver": {"lr": 0.5}})
    cfg = load_config(str(path), ["solver.lr=0.01", "model.transform.min_size=[480,512]",
                                  "solver.schedule=cosine", "train.debug_nan_at=3:loss_cls"])
    assert cfg["solver"]["lr"] == 0.01
    assert cfg["model"]["transform"]["min_size"] == [480, 512]
    assert cfg["solver"]["schedule"] == "cosine"
    assert cfg["train"]["debug_nan_at"] == "3:loss_cls"


def test_unknown_key_in_file_names_file_key_and_valid_keys(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"solver": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert "bad.yaml" in msg and "solver.lrr" in msg
    assert "lr" in msg and "momentum" in msg  # the valid keys at that level


def test_unknown_key_in_base_file_and_in_override(tmp_path):
    _write(tmp_path / "base.yaml", {"modle": {}})
    child = _write(tmp_path / "child.yaml", {"_base_": "base.yaml"})
    with pytest.raises(ConfigError, match="modle"):
        load_config(str(child))
    with pytest.raises(ConfigError, match="solver.warmup"):
        load_config(None, ["solver.warmup=10"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["solver.lr"])


def test_missing_base_and_cycle_are_errors(tmp_path):
    child = _write(tmp_path / "child.yaml", {"_base_": "nope.yaml"})
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(child))
    _write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["solver.lr=0.003"])
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    assert load_config(str(tmp_path / "run" / "config.yaml")) == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    if name in ("voc", "coco", "bdd"):  # the paper's settings
        assert cfg["model"]["backbone"]["name"] == "resnet50"
        assert cfg["model"]["transform"]["test_min_size"] == 800
        assert min(cfg["model"]["transform"]["min_size"]) == 400
        assert max(cfg["model"]["transform"]["min_size"]) == 1300
        assert cfg["solver"]["epochs"] == 24 and cfg["solver"]["lr"] == 0.02
        assert cfg["solver"]["steps"] == [16, 22] and cfg["solver"]["gamma"] == 0.1
        assert cfg["data"]["images_per_batch"] == 2


def test_complete_config_fills_keys_added_since_a_checkpoint_was_saved():
    from autofpn.config import ConfigError, complete_config, load_config
    old = load_config(None)
    del old["model"]["detector"], old["search"]["strategy"]  # keys that did not exist yet
    cfg = complete_config(old, ["solver.lr=0.5"])
    assert cfg["model"]["detector"] == "faster_rcnn" and cfg["search"]["strategy"] == "differentiable"
    assert cfg["solver"]["lr"] == 0.5 and "detector" not in old["model"]  # the saved dict is untouched
    old["model"]["gone_key"] = 1
    with pytest.raises(ConfigError, match="ckpt.pth.*model.gone_key"):
        complete_config(old, where="ckpt.pth")


def test_a_dataset_spec_with_a_type_replaces_the_inherited_one(tmp_path):
    child = tmp_path / "mine.yaml"
    base = REPO / "configs" / "voc.yaml"
    child.write_text(f"_base_: {base}\n"
                     "data:\n  val: {type: voc, annotations: xml, images: img}\n")
    cfg = load_config(str(child))
    assert cfg["data"]["val"]["splits"] is None and cfg["data"]["val"]["root"] is None
    assert cfg["data"]["val"]["annotations"] == "xml"
    assert cfg["data"]["train"]["splits"] == ["trainval", "trainval"]  # untouched
    # without a type, a key updates the inherited spec
    cfg = load_config(str(child), ["data.train.root=elsewhere"])
    assert cfg["data"]["train"] == {**load_config(str(child))["data"]["train"], "root": "elsewhere"}


def test_search_ensemble_takes_a_positive_count():
    assert load_config(None, ["search.ensemble=3"])["search"]["ensemble"] == 3
    for bad in ("0", "-1", "2.5", "true"):
        with pytest.raises(ConfigError, match="search.ensemble"):
            load_config(None, [f"search.ensemble={bad}"])
