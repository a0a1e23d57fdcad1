import pytest

from scalelab.config import UserError, dump_toml, load_config


def test_presets_load_and_overrides_apply():
    cfg = load_config("configs/tiny.toml", ["train.lr=0.01", "model.mlp=relu2",
                                            "train.compile=true", "data.source=foo.txt"])
    assert cfg.train.lr == 0.01 and cfg.model.mlp == "relu2" and cfg.train.compile
    assert cfg.data.source == "foo.txt" and cfg.model.n_layer == 4
    for name in ("small", "gpt2-124m"):
        load_config(f"configs/{name}.toml")


def test_dump_round_trips(tmp):
    cfg = load_config("configs/tiny.toml", ['train.sample_prompt="say \\"hi\\""'])
    (tmp / "c.toml").write_text(dump_toml(cfg))
    assert load_config(tmp / "c.toml") == cfg


@pytest.mark.parametrize("sets, match", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["trian.lr=1"], r"unknown config section \[trian\]"),
    (["train.max_steps=ten"], "must be int"),
    (["train.lr"], "expected section.key=value"),
    # ppo with adaptive_kl divided by it: a ZeroDivisionError traceback after the first step
    (["ppo.target_kl=0"], "'ppo.target_kl' must be > 0"),
])
def test_bad_overrides(sets, match):
    with pytest.raises(UserError, match=match):
        load_config(None, sets)


def test_bad_files(tmp):
    (tmp / "bad.toml").write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="bad.toml: malformed TOML"):
        load_config(tmp / "bad.toml")
    (tmp / "typo.toml").write_text("[model]\nlayers = 3\n")
    with pytest.raises(UserError, match="typo.toml: unknown config key 'model.layers'"):
        load_config(tmp / "typo.toml")
    with pytest.raises(UserError, match="not found"):
        load_config(tmp / "missing.toml")


def test_preset_name_wins_over_a_folder_of_that_name(tmp, monkeypatch):
    """`scalelab sft --out sft` leaves a folder ./sft; the next `scalelab sft` (preset sft)
    or `--config tiny` beside a run folder ./tiny must still find the preset."""
    from scalelab.config import PRESETS, resolve_config_path
    monkeypatch.chdir(tmp)
    for name in ("sft", "tiny"):
        (tmp / name).mkdir()
        assert resolve_config_path(name) == PRESETS / f"{name}.toml"
    (tmp / "mine").mkdir()
    with pytest.raises(UserError, match="mine: is a folder, not a config file"):
        resolve_config_path("mine")
