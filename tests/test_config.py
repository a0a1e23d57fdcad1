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


def test_dump_round_trips_control_characters(tmp):
    """A sample_prompt with a newline (valid TOML: "Q: hi\\nA:") was written raw into the
    run's config.toml, which then failed to parse: --resume said 'malformed TOML'."""
    (tmp / "in.toml").write_text('[train]\nsample_prompt = "Q: hi\\n\\tA:\\u0007\\u007f '
                                 '\\\\ \\" ü🙂"\n[data]\nsource = "a\\nb.txt"\n', encoding="utf-8")
    cfg = load_config(tmp / "in.toml")
    assert cfg.train.sample_prompt == 'Q: hi\n\tA:\x07\x7f \\ " ü🙂'
    (tmp / "c.toml").write_text(dump_toml(cfg), encoding="utf-8")
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


def test_config_file_with_a_byte_order_mark(tmp):
    """Notepad and other Windows editors may start a hand-written config with a BOM; it read
    as 'malformed TOML ... (at line 1, column 1)'. The data readers accept one already."""
    (tmp / "bom.toml").write_bytes("\ufeff[train]\nlr = 1e-3\nsample_prompt = \"Mía\"\n"
                                   .encode("utf-8"))
    cfg = load_config(tmp / "bom.toml")
    assert (cfg.train.lr, cfg.train.sample_prompt) == (1e-3, "Mía")


def test_seed_too_large_is_bad_input():
    """train.seed=99999999999999999999 (or 2^62) passed the config checks and then torch
    raised 'Overflow when unpacking long long' (a traceback) after the corpus was built."""
    from scalelab.data.batches import EpochSampler
    for v in (2**32, -2**32, 2**62, 10**20):
        with pytest.raises(UserError, match=f"train.seed = {v} must be between -2\\^32 and"):
            load_config(overrides=[f"train.seed={v}"])
    for v in (2**32 - 1, -2**32 + 1, -5):  # the extremes allowed still sample batches
        seed = load_config(overrides=[f"train.seed={v}"]).train.seed
        assert len(EpochSampler(10, 2, seed).next_indices()) == 2


def test_reward_samples_per_prompt_floor_is_checked_at_load(tmp):
    """reward.samples_per_prompt=1 (no two answers to rank) was refused only once the
    preference data was being made, after the model had loaded; it is a bound like any other."""
    with pytest.raises(UserError, match=r"--set reward.samples_per_prompt: "
                                        r"reward.samples_per_prompt = 1 must be >= 2 \(ranking"):
        load_config(overrides=["reward.samples_per_prompt=1"])
    (tmp / "c.toml").write_text("[reward]\nsamples_per_prompt = 1\n")
    with pytest.raises(UserError, match="c.toml: reward.samples_per_prompt = 1 must be >= 2"):
        load_config(tmp / "c.toml")
    assert load_config(overrides=["reward.samples_per_prompt=2"]).reward.samples_per_prompt == 2
    assert load_config(overrides=["ppo.samples_per_prompt=1"])  # one per prompt: PPO can
